//! `lora merge` on Stable Diffusion pipelines: the merged pipeline is written in the layout it was
//! read from (a diffusers directory, an SD 1.x single file, an SD 2.x single file with OpenCLIP's
//! fused attention), and reading it back gives the merged weights as stored (each in its dtype:
//! the in-memory merge rounded to fp16), with everything the merge did not touch byte for byte
//! as it was. Outputs never replace inputs or files lora-rs did not write.

use lora_io::safetensors::SafetensorsFile;
use lora_io::sd::SdPipeline;
use lora_io::sd_lora::{merge_sd_lora, read_sd_lora, Component};
use lora_io::sd_merge::write_merged;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fx(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/parity")
        .join(p)
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lora-sd-merge-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Every linear and convolution weight of the UNet and the text encoder.
fn weights(p: &SdPipeline) -> BTreeMap<String, Vec<f32>> {
    let mut m = BTreeMap::new();
    for (n, l) in p.unet.linears() {
        m.insert(format!("unet.{n}"), l.base().0.try_to_vec().unwrap());
    }
    for (n, c) in p.unet.convs() {
        m.insert(format!("unet.{n}"), c.base().0.try_to_vec().unwrap());
    }
    for (n, l) in p.text_encoder.linears() {
        m.insert(format!("te.{n}"), l.base().0.try_to_vec().unwrap());
    }
    m
}

fn f16_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect()
}

/// Merges the fixture LoRAs (PEFT UNet 1.0, kohya LoCon 0.8, PEFT text encoder 1.0 where
/// `unet` / `te`) into `pipe`; returns the changed layers.
fn merge(pipe: &mut SdPipeline, unet: bool, te: bool) -> Vec<(Component, String)> {
    let mut files = Vec::new();
    if unet {
        files.push(("sd_lora/peft.safetensors", 1.0));
        files.push(("sd_lora/kohya.safetensors", 0.8));
    }
    if te {
        files.push(("sd_lora/te_peft.safetensors", 1.0));
    }
    let mut changed = Vec::new();
    for (f, w) in files {
        let l = read_sd_lora(&fx(f)).unwrap();
        changed.extend(merge_sd_lora(pipe, &l, w, false).unwrap().layers);
    }
    changed
}

/// Read back, every weight is the in-memory merge as fp16 stores it.
fn assert_stored_as_merged(back: &SdPipeline, merged: &SdPipeline, what: &str) {
    let (b, m) = (weights(back), weights(merged));
    assert_eq!(b.len(), m.len());
    for (k, v) in &m {
        assert!(
            b[k].iter()
                .zip(f16_round(v))
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "{what}: {k}"
        );
    }
}

#[test]
fn a_diffusers_directory_is_merged_into_a_directory() {
    let src = fx("sd_pipeline/model");
    let mut pipe = SdPipeline::open(&src).unwrap();
    let before = weights(&pipe);
    let changed = merge(&mut pipe, true, true);
    assert_eq!(
        changed.len(),
        45 + 32 + 6,
        "kohya 45, PEFT unet 32, text encoder 6"
    );
    let out = tmp("dir").join("merged");
    let rep = write_merged(&pipe, &changed, &out, false, &[("--model", &src)]).unwrap();
    let back = SdPipeline::open(&out).unwrap();
    assert_stored_as_merged(&back, &pipe, "directory");
    // The merge changed what it merged, and only that.
    let after = weights(&back);
    let touched: std::collections::HashSet<String> = changed
        .iter()
        .map(|(c, n)| match c {
            Component::Unet => format!("unet.{n}"),
            Component::TextEncoder => format!("te.{n}"),
        })
        .collect();
    for (k, v) in &before {
        assert_eq!(after[k] != *v, touched.contains(k), "{k}");
    }
    assert!(rep.replaced > 0 && rep.replaced == touched.len());
    // Everything else is copied as it was.
    for f in [
        "model_index.json",
        "vae/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "unet/config.json",
        "text_encoder/config.json",
        "tokenizer/tokenizer.json",
        "scheduler/scheduler_config.json",
    ] {
        assert_eq!(
            std::fs::read(src.join(f)).unwrap(),
            std::fs::read(out.join(f)).unwrap(),
            "{f}"
        );
    }
    // Again without --force: refused; with it: replaced.
    let e = write_merged(&pipe, &changed, &out, false, &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("--force"), "{e}");
    // A user's `.merged.old` beside it stays; no temporary is left.
    let users = out.parent().unwrap().join(".merged.old");
    std::fs::create_dir_all(&users).unwrap();
    std::fs::write(users.join("keep.txt"), "mine").unwrap();
    write_merged(&pipe, &changed, &out, true, &[]).unwrap();
    assert_eq!(
        std::fs::read_to_string(users.join("keep.txt")).unwrap(),
        "mine"
    );
    let mut left: Vec<String> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    left.sort();
    assert_eq!(left, [".merged.old", "merged"]);
    // Never inside the pipeline it copies.
    let e = write_merged(
        &pipe,
        &changed,
        &src.join("merged"),
        false,
        &[("--model", &src)],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("inside the pipeline"), "{e}");
    assert!(!src.join("merged").exists());
    // Never into the model itself.
    let e = write_merged(&pipe, &changed, &src, true, &[("--model", &src)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("--model"), "{e}");
    std::fs::remove_dir_all(out.parent().unwrap()).ok();
}

#[test]
fn a_single_file_is_merged_into_a_single_file() {
    let cfg = fx("sd_pipeline/model");
    let src = fx("sd_single/sd1.safetensors");
    let mut pipe = SdPipeline::open_single(&src, Some(&cfg)).unwrap();
    let changed = merge(&mut pipe, true, true);
    let dir = tmp("sd1");
    let out = dir.join("merged.safetensors");
    write_merged(&pipe, &changed, &out, false, &[("--model", &src)]).unwrap();
    let back = SdPipeline::open_single(&out, Some(&cfg)).unwrap();
    assert_stored_as_merged(&back, &pipe, "sd1 single file");
    // The same weights as the directory merged.
    let mut from_dir = SdPipeline::open(&cfg).unwrap();
    merge(&mut from_dir, true, true);
    assert_stored_as_merged(&back, &from_dir, "sd1 single file vs directory");
    // What is not a merged layer's weight is kept byte for byte: the VAE, the buffers, the
    // EMA scalar, the int64 position ids.
    let (a, b) = (
        SafetensorsFile::open(&src).unwrap(),
        SafetensorsFile::open(&out).unwrap(),
    );
    assert_eq!(a.names(), b.names());
    let mut same = 0;
    for k in a.names() {
        assert_eq!(a.meta(k).unwrap().dtype, b.meta(k).unwrap().dtype, "{k}");
        if a.raw_bytes(k).unwrap() == b.raw_bytes(k).unwrap() {
            same += 1;
        } else {
            assert!(
                k.starts_with("model.diffusion_model.") || k.starts_with("cond_stage_model."),
                "{k}"
            );
        }
    }
    let layers: std::collections::HashSet<_> = changed.iter().collect();
    assert_eq!(same, a.names().len() - layers.len());
    for k in [
        "alphas_cumprod",
        "model_ema.decay",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
    ] {
        assert_eq!(a.raw_bytes(k).unwrap(), b.raw_bytes(k).unwrap(), "{k}");
    }
    assert!(b.metadata.contains_key(lora_io::outdir::FILE_MARK));
    // Not over the input; not over a file lora-rs did not write; again only with --force.
    let e = write_merged(&pipe, &changed, &src, true, &[("--model", &src)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("--model"), "{e}");
    let foreign = dir.join("foreign.safetensors");
    std::fs::copy(&src, &foreign).unwrap();
    let e = write_merged(&pipe, &changed, &foreign, true, &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("not written by lora-rs"), "{e}");
    assert_eq!(
        std::fs::read(&foreign).unwrap(),
        std::fs::read(&src).unwrap()
    );
    let e = write_merged(&pipe, &changed, &out, false, &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("--force"), "{e}");
    write_merged(&pipe, &changed, &out, true, &[]).unwrap();
    // --force replaces an earlier merge only, not another file lora-rs wrote (a trained LoRA).
    let lora = dir.join("trained.safetensors");
    let meta = [(
        lora_io::outdir::FILE_MARK.to_string(),
        "lora train (stable diffusion)".to_string(),
    )]
    .into_iter()
    .collect();
    let v = [0.0f32; 4];
    let t = lora_io::write::OutTensor {
        name: "x".into(),
        shape: vec![4],
        values: &v,
        dtype: lora_io::write::OutDtype::F32,
    };
    lora_io::write::write_safetensors(&lora, &[t], meta).unwrap();
    let before = std::fs::read(&lora).unwrap();
    let e = write_merged(&pipe, &changed, &lora, true, &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("not by `lora merge`"), "{e}");
    assert_eq!(std::fs::read(&lora).unwrap(), before);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn open_clip_fused_attention_is_patched_row_wise() {
    let dir = fx("sd_single");
    let src = dir.join("sd2.safetensors");
    let cfg = dir.join("sd2_config");
    let mut pipe = SdPipeline::open_single(&src, Some(&cfg)).unwrap();
    // The text-encoder LoRA (q, v and out of the first two layers; width 32 as here): the k
    // rows of the fused tensors stay as they were.
    let changed = merge(&mut pipe, false, true);
    assert_eq!(changed.len(), 6, "q, v and out of two layers");
    let t = tmp("sd2");
    let out = t.join("merged.safetensors");
    write_merged(&pipe, &changed, &out, false, &[("--model", &src)]).unwrap();
    let back = SdPipeline::open_single(&out, Some(&cfg)).unwrap();
    assert_stored_as_merged(&back, &pipe, "sd2 single file");
    let (a, b) = (
        SafetensorsFile::open(&src).unwrap(),
        SafetensorsFile::open(&out).unwrap(),
    );
    // Layers 0 and 1 changed (fused q/k/v and out_proj weights); the skipped last block and
    // the projection did not.
    let changed_keys: Vec<&str> = a
        .names()
        .into_iter()
        .filter(|k| a.raw_bytes(k).unwrap() != b.raw_bytes(k).unwrap())
        .collect();
    assert_eq!(
        changed_keys,
        [
            "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
            "cond_stage_model.model.transformer.resblocks.0.attn.out_proj.weight",
            "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight",
            "cond_stage_model.model.transformer.resblocks.1.attn.out_proj.weight",
        ]
    );
    assert!(Path::new(&out).exists());
    std::fs::remove_dir_all(&t).ok();
}
