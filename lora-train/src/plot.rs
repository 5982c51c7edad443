//! The loss curve of a run as a self-contained SVG (train loss per step, eval loss points),
//! drawn from `metrics.jsonl`, so a resumed run plots its whole history.

use crate::{Result, TrainError};
use std::fmt::Write as _;
use std::path::Path;

/// Reads `(step, loss)` and `(step, eval_loss)` series from a metrics file.
pub fn read_metrics(path: &Path) -> Result<(Vec<(f64, f64)>, Vec<(f64, f64)>)> {
    lora_io::files::check_regular(path, u64::MAX, "metrics")?;
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::Data {
        path: path.into(),
        reason: e.to_string(),
    })?;
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(step) = v["step"].as_f64() else {
            continue;
        };
        if let Some(l) = v["loss"].as_f64() {
            train.push((step, l));
        }
        if let Some(e) = v["eval_loss"].as_f64() {
            eval.push((step, e));
        }
    }
    Ok((train, eval))
}

/// Writes the SVG (atomically).
pub fn write_loss_svg(path: &Path, train: &[(f64, f64)], eval: &[(f64, f64)]) -> Result<()> {
    let (w, h, m) = (640.0, 400.0, 50.0);
    let all = train.iter().chain(eval);
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        if y.is_finite() {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    let (x1, y1) = (
        if x1 > x0 { x1 } else { x0 + 1.0 },
        if y1 > y0 { y1 } else { y0 + 1.0 },
    );
    let px = |x: f64| m + (x - x0) / (x1 - x0) * (w - 2.0 * m);
    let py = |y: f64| h - m - (y - y0) / (y1 - y0) * (h - 2.0 * m);
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>"##
    );
    let _ = write!(
        s,
        r##"<line x1="{m}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/><line x1="{m}" y1="{m}" x2="{m}" y2="{b}" stroke="black"/>"##,
        b = h - m,
        r = w - m
    );
    for i in 0..=4 {
        let y = y0 + (y1 - y0) * i as f64 / 4.0;
        let _ = write!(
            s,
            r##"<text x="{}" y="{}" text-anchor="end">{y:.3}</text>"##,
            m - 4.0,
            py(y) + 4.0
        );
        let x = x0 + (x1 - x0) * i as f64 / 4.0;
        let _ = write!(
            s,
            r##"<text x="{}" y="{}" text-anchor="middle">{x:.0}</text>"##,
            px(x),
            h - m + 16.0
        );
    }
    let pts: Vec<String> = train
        .iter()
        .filter(|p| p.1.is_finite())
        .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
        .collect();
    let _ = write!(
        s,
        r##"<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{}"/>"##,
        pts.join(" ")
    );
    for &(x, y) in eval.iter().filter(|p| p.1.is_finite()) {
        let _ = write!(
            s,
            r##"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="#ff7f0e"/>"##,
            px(x),
            py(y)
        );
    }
    let _ = write!(
        s,
        r##"<text x="{}" y="20" text-anchor="middle" font-size="14">loss over steps</text><text x="{}" y="36" fill="#1f77b4">train</text><text x="{}" y="36" fill="#ff7f0e">eval</text><text x="{}" y="{}" text-anchor="middle">step</text></svg>"##,
        w / 2.0,
        w - 120.0,
        w - 70.0,
        w / 2.0,
        h - 12.0
    );
    lora_io::write::write_atomic(path, s.as_bytes())?;
    Ok(())
}
