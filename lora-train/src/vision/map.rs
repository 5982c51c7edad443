//! Mean average precision as pycocotools' `COCOeval` computes it for boxes: per class and IoU
//! threshold (0.50, 0.55, ..., 0.95), detections of each image sorted by score (stable) and cut
//! to the 100 best, greedily matched to the unmatched ground truth of highest IoU (crowd boxes
//! match repeatedly and count neither way), precision made monotone and sampled at 101 recall
//! points; AP is the mean over the classes that have ground truth and over the thresholds.
//! `map50` is the same at IoU 0.5 alone, `map75` at 0.75.

use std::collections::BTreeMap;

/// A ground-truth box: image, class, `[x, y, w, h]` (any consistent unit), crowd flag.
#[derive(Clone, Debug, PartialEq)]
pub struct GroundTruth {
    /// Image index.
    pub image: usize,
    /// Class index.
    pub class: usize,
    /// `[x, y, w, h]`.
    pub bbox: [f64; 4],
    /// COCO's `iscrowd`: matched by any number of detections, counted neither as found nor
    /// missed.
    pub crowd: bool,
}

/// A detection: image, class, `[x, y, w, h]`, score.
#[derive(Clone, Debug, PartialEq)]
pub struct Detection {
    /// Image index.
    pub image: usize,
    /// Class index.
    pub class: usize,
    /// `[x, y, w, h]`.
    pub bbox: [f64; 4],
    /// Confidence.
    pub score: f64,
}

/// The summary numbers.
#[derive(Clone, Debug, PartialEq)]
pub struct MapReport {
    /// AP averaged over IoU 0.50:0.95 (COCO's "mAP").
    pub map: f64,
    /// AP at IoU 0.50.
    pub map50: f64,
    /// AP at IoU 0.75.
    pub map75: f64,
    /// Each class's `[AP@[.5:.95], AP@.5]` (`None` for a class without ground truth, which
    /// the means leave out as pycocotools does).
    pub per_class: Vec<Option<[f64; 2]>>,
}

/// COCO's `maxDets` for the headline numbers.
const MAX_DETS: usize = 100;

fn iou(d: &[f64; 4], g: &[f64; 4], crowd: bool) -> f64 {
    let iw = (d[0] + d[2]).min(g[0] + g[2]) - d[0].max(g[0]);
    let ih = (d[1] + d[3]).min(g[1] + g[3]) - d[1].max(g[1]);
    if iw <= 0.0 || ih <= 0.0 {
        return 0.0;
    }
    let inter = iw * ih;
    let union = if crowd {
        d[2] * d[3]
    } else {
        d[2] * d[3] + g[2] * g[3] - inter
    };
    inter / union
}

/// Indices of `scores` sorted by decreasing score, ties in their given order (numpy's
/// `argsort(-s, kind="mergesort")`).
fn by_score(scores: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    idx
}

/// pycocotools' bbox mAP over `num_classes` classes (see the module documentation).
pub fn coco_map(gts: &[GroundTruth], dets: &[Detection], num_classes: usize) -> MapReport {
    // numpy's linspace(0.5, 0.95, 10) and linspace(0, 1, 101), to the bit: i * step + start,
    // the last value exactly the stop.
    let step = (0.95 - 0.5) / 9.0;
    let thresholds: Vec<f64> = (0..10)
        .map(|i| if i == 9 { 0.95 } else { i as f64 * step + 0.5 })
        .collect();
    // precision[t][class] = 101 sampled values, or None for a class without ground truth.
    let mut precision: Vec<Vec<Option<Vec<f64>>>> = vec![vec![None; num_classes]; thresholds.len()];
    // Boxes by (class, image), each list in its given order: one pass over the inputs.
    type Boxes<'a> = (Vec<&'a GroundTruth>, Vec<&'a Detection>);
    let mut at: BTreeMap<(usize, usize), Boxes> = BTreeMap::new();
    for g in gts {
        at.entry((g.class, g.image)).or_default().0.push(g);
    }
    for d in dets {
        at.entry((d.class, d.image)).or_default().1.push(d);
    }
    for class in 0..num_classes {
        // Per image (in image order; an image with neither box of this class is skipped, as
        // pycocotools skips it): the ground truth, regular first and crowd last (COCO's order),
        // and the detections sorted by score and cut to MAX_DETS.
        let mut per_image: Vec<Boxes> = Vec::new();
        let mut npig = 0usize;
        for (_, (g, d)) in at.range((class, 0)..(class + 1, 0)) {
            let mut g = g.clone();
            g.sort_by_key(|g| g.crowd); // stable: regular boxes in order, then crowd ones
            npig += g.iter().filter(|g| !g.crowd).count();
            let order = by_score(&d.iter().map(|d| d.score).collect::<Vec<_>>());
            let d: Vec<&Detection> = order.into_iter().take(MAX_DETS).map(|i| d[i]).collect();
            per_image.push((g, d));
        }
        if npig == 0 {
            continue;
        }
        for (ti, &t) in thresholds.iter().enumerate() {
            // (score, matched, ignored) of every detection, image by image in score order.
            let mut scored: Vec<(f64, bool, bool)> = Vec::new();
            for (g, d) in &per_image {
                let mut gt_matched = vec![false; g.len()];
                for det in d {
                    let mut best = t.min(1.0 - 1e-10);
                    let mut m: Option<usize> = None;
                    for (gi, gt) in g.iter().enumerate() {
                        if gt_matched[gi] && !gt.crowd {
                            continue;
                        }
                        // Already matched to a regular box: crowd boxes (last) cannot beat it.
                        if let Some(mi) = m {
                            if !g[mi].crowd && gt.crowd {
                                break;
                            }
                        }
                        let v = iou(&det.bbox, &gt.bbox, gt.crowd);
                        if v < best {
                            continue;
                        }
                        best = v;
                        m = Some(gi);
                    }
                    match m {
                        Some(gi) => {
                            gt_matched[gi] = true;
                            scored.push((det.score, true, g[gi].crowd));
                        }
                        None => scored.push((det.score, false, false)),
                    }
                }
            }
            let order = by_score(&scored.iter().map(|s| s.0).collect::<Vec<_>>());
            let (mut tp, mut fp) = (0.0f64, 0.0f64);
            let mut rc = Vec::new();
            let mut pr = Vec::new();
            for i in order {
                let (_, matched, ignored) = scored[i];
                if ignored {
                    // pycocotools keeps ignored detections in the arrays with neither count
                    // increasing.
                } else if matched {
                    tp += 1.0;
                } else {
                    fp += 1.0;
                }
                rc.push(tp / npig as f64);
                pr.push(tp / (tp + fp + f64::EPSILON));
            }
            for i in (1..pr.len()).rev() {
                if pr[i] > pr[i - 1] {
                    pr[i - 1] = pr[i];
                }
            }
            let q: Vec<f64> = (0..=100)
                .map(|r| {
                    let r = if r == 100 { 1.0 } else { r as f64 * 0.01 };
                    // np.searchsorted(rc, r, side="left")
                    let pi = rc.partition_point(|&x| x < r);
                    pr.get(pi).copied().unwrap_or(0.0)
                })
                .collect();
            precision[ti][class] = Some(q);
        }
    }
    let mean = |ts: &[usize]| -> f64 {
        let (mut s, mut n) = (0.0, 0usize);
        for &t in ts {
            for q in precision[t].iter().flatten() {
                s += q.iter().sum::<f64>();
                n += q.len();
            }
        }
        if n == 0 {
            -1.0
        } else {
            s / n as f64
        }
    };
    let per_class = (0..num_classes)
        .map(|c| {
            let ap = |t: usize| {
                precision[t][c]
                    .as_ref()
                    .map(|q| q.iter().sum::<f64>() / q.len() as f64)
            };
            let all: Option<Vec<f64>> = (0..10).map(ap).collect();
            all.map(|v| [v.iter().sum::<f64>() / v.len() as f64, v[0]])
        })
        .collect();
    MapReport {
        map: mean(&(0..10).collect::<Vec<_>>()),
        map50: mean(&[0]),
        map75: mean(&[5]),
        per_class,
    }
}
