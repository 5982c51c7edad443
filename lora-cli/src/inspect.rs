//! `lora inspect`: what a model directory, an adapter directory or a safetensors file holds.

use crate::args::InspectArgs;
use anyhow::Result;
use std::path::Path;

/// `lora inspect`.
pub fn command(a: InspectArgs) -> Result<()> {
    run_inspect(&a.path, a.json)
}

pub fn run_inspect(path: &Path, json: bool) -> Result<()> {
    use lora_io::inspect::{inspect, Report};
    let rep = inspect(path)?;
    if json {
        outln!("{}", serde_json::to_string(&rep)?);
        return Ok(());
    }
    let tensors = |ts: &[lora_io::inspect::TensorEntry]| {
        for t in ts {
            outln!("  {:<60} {:<5} {:?}", t.name, t.dtype, t.shape);
        }
    };
    match rep {
        Report::Model {
            architecture,
            params,
            linear_modules,
            tensors: ts,
        } => {
            outln!("model: {architecture}");
            outln!("parameters: {params}");
            outln!(
                "linear modules ({}): {}",
                linear_modules.len(),
                linear_modules.join(", ")
            );
            outln!("tensors ({}):", ts.len());
            tensors(&ts);
        }
        Report::Adapter {
            target_modules,
            use_rslora,
            params,
            modules,
        } => {
            outln!("PEFT LoRA adapter: target_modules {target_modules}, rsLoRA {use_rslora}, {params} parameters, {} modules", modules.len());
            outln!(
                "  {:<50} {:>4} {:>7} {:>8} {:>10} {:>10} {:>12}",
                "module",
                "r",
                "alpha",
                "scale",
                "|A|",
                "|B|",
                "|s*B@A|"
            );
            let damaged: usize = modules.iter().map(|m| m.non_finite).sum();
            for m in modules {
                outln!(
                    "  {:<50} {:>4} {:>7} {:>8.4} {:>10.4} {:>10.4} {:>12.4}",
                    m.module,
                    m.r,
                    m.alpha,
                    m.scale,
                    m.norm_a,
                    m.norm_b,
                    m.norm_delta
                );
            }
            if damaged > 0 {
                outln!("warning: {damaged} values of A and B are NaN or infinite: this adapter is damaged, and eval, generate and merge refuse it");
            }
        }
        Report::SdLora {
            format,
            params,
            blocks,
            modules,
        } => {
            outln!(
                "Stable Diffusion LoRA ({format}): {} modules, {params} parameters",
                modules.len()
            );
            outln!(
                "  {:<32} {:>7} {:>10} {:>18} {:>12}",
                "block",
                "modules",
                "ranks",
                "scales",
                "|s*B@A|"
            );
            let list = |v: Vec<String>| v.join(",");
            for b in &blocks {
                outln!(
                    "  {:<32} {:>7} {:>10} {:>18} {:>12.4}",
                    b.block,
                    b.modules,
                    list(b.ranks.iter().map(|r| r.to_string()).collect()),
                    list(b.scales.iter().map(|s| format!("{s}")).collect()),
                    b.norm_delta
                );
            }
            outln!(
                "  {:<70} {:>10} {:>4} {:>8} {:>12}",
                "module",
                "kind",
                "r",
                "scale",
                "|s*B@A|"
            );
            for m in &modules {
                outln!(
                    "  {:<70} {:>10} {:>4} {:>8.4} {:>12.4}",
                    format!("{} {}", m.component, m.module),
                    m.kind,
                    m.r,
                    m.scale,
                    m.norm_delta
                );
            }
        }
        Report::File {
            params,
            metadata,
            tensors: ts,
        } => {
            outln!(
                "safetensors file: {} tensors, {params} parameters",
                ts.len()
            );
            for (k, v) in metadata {
                outln!("  metadata {k} = {v}");
            }
            tensors(&ts);
        }
    }
    Ok(())
}
