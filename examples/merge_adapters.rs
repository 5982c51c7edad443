//! Two adapters trained for the same model, combined into one (PEFT's `add_weighted_adapter`,
//! here the exact `cat` combination) and then merged into the base weights, giving a plain model
//! directory with no adapter at all. Checks that each stage computes the same logits.
//!
//! `cargo run --release -p lora-examples --example merge_adapters`
//! (uses the small Llama checkpoint and adapters in `fixtures/parity/llama_gqa`).

use lora_core::models::CausalLm;
use lora_core::Tape;
use lora_io::combine::{combine, write, AdapterWeights, Combination};
use lora_io::hf::ModelDir;
use lora_io::merge::{merge_to_dir, MergeOptions};
use lora_io::peft::load_adapter;
use std::error::Error;

fn logits(model: &dyn CausalLm, ids: &[u32]) -> lora_core::Result<Vec<f32>> {
    Ok(model
        .forward(&Tape::inference(), ids, 1, ids.len(), true)?
        .to_vec())
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

fn main() -> Result<(), Box<dyn Error>> {
    let root = lora_examples::repo_root().join("fixtures/parity/llama_gqa");
    let base = root.join("model");
    let work = std::env::temp_dir().join(format!("lora-example-merge-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let ids = [1u32, 17, 42, 99, 7, 250, 3];

    // 1. Combine: 0.7 * adapter + 0.3 * adapter2, exactly (the ranks add up).
    let inputs = [
        AdapterWeights::read(&root.join("adapter"))?,
        AdapterWeights::read(&root.join("adapter2"))?,
    ];
    let (cfg, modules) = combine(&inputs, &[0.7, 0.3], Combination::Cat)?;
    write(&work.join("combined"), &cfg, &modules)?;
    println!(
        "combined two adapters into rank {} over {} modules",
        cfg.r,
        modules.len()
    );

    // 2. The combined adapter on the base model.
    let md = ModelDir::open(&base)?;
    let mut with_adapter = md.load_model()?;
    load_adapter(with_adapter.as_mut(), &work.join("combined"))?;
    let adapted = logits(with_adapter.as_ref(), &ids)?;
    let plain = logits(md.load_model()?.as_ref(), &ids)?;

    // 3. Merge it into the weights: a complete model directory (transformers loads it too).
    let rep = merge_to_dir(
        &base,
        &work.join("combined"),
        &work.join("merged"),
        MergeOptions::default(),
    )?;
    println!(
        "merged {} layers into {}",
        rep.merged.len(),
        rep.out.display()
    );
    let merged = logits(
        ModelDir::open(work.join("merged"))?.load_model()?.as_ref(),
        &ids,
    )?;

    let (change, err) = (max_diff(&plain, &adapted), max_diff(&adapted, &merged));
    println!("adapter changes the logits by up to {change:.3e}; merged vs adapter: {err:.2e}");
    std::fs::remove_dir_all(&work)?;
    if change < 1e-4 || err > 1e-4 {
        return Err(format!("unexpected: change {change}, merge error {err}").into());
    }
    Ok(())
}

#[test]
fn example_runs() {
    main().unwrap();
}
