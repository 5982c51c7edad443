//! Stable Diffusion LoRA files against diffusers and PEFT (fixtures/parity/make_sd_lora.py, on
//! the tiny pipeline of make_sd_pipeline.py): a diffusers/PEFT file (UNet attention, an alpha
//! pattern in diffusers' header metadata) and a kohya LoCon file (attention, 1x1 and 3x3
//! convolutions, time_emb_proj, a downsampler, per-module alphas) merged into the pipeline give
//! diffusers' images after `load_lora_weights`, alone and together with weights 1.0 and 0.8;
//! text-encoder files in both formats give PEFT's text states. Bad files are named errors.

use lora_core::diffusion::{decode_latents, denoise, Conditioning};
use lora_io::diffusion::SamplerKind;
use lora_io::safetensors::SafetensorsFile;
use lora_io::sd::SdPipeline;
use lora_io::sd_lora::{merge_sd_lora, read_sd_lora};
use std::path::PathBuf;

fn fx(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/parity")
        .join(p)
}

const PROMPTS: [&str; 2] = [
    "a red fox in the snow",
    "a photograph of an astronaut riding a horse",
];

/// The images (B, H, W, 3) the pipeline makes with the fixture's settings.
fn images(pipe: &SdPipeline) -> Vec<f32> {
    let r = SafetensorsFile::open(fx("sd_pipeline/reference.safetensors")).unwrap();
    let (noise, _) = r.read_f32("latents").unwrap();
    let shape = pipe.latent_shape(2, 24, 16).unwrap();
    let cond = pipe.encode_prompts(&PROMPTS, 0).unwrap();
    let uncond = pipe.encode_prompts(&["blurry", "blurry"], 0).unwrap();
    let mut sampler = pipe.sampler(SamplerKind::Euler, 4).unwrap();
    let c = Conditioning {
        cond: &cond,
        uncond: &uncond,
        guidance: 7.5,
    };
    let lat = denoise(
        &pipe.unet,
        sampler.as_mut(),
        &noise,
        shape,
        &c,
        false,
        &mut |_, _| {},
    )
    .unwrap();
    let img = decode_latents(&pipe.vae, &lat, shape).unwrap();
    let (h, w) = (24, 16);
    let mut out = vec![0.0; img.len()];
    for b in 0..2 {
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    out[((b * h + y) * w + x) * 3 + c] = img[((b * 3 + c) * h + y) * w + x];
                }
            }
        }
    }
    out
}

fn worst(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn merged_unet_loras_give_diffusers_images() {
    let r = SafetensorsFile::open(fx("sd_lora/reference.safetensors")).unwrap();
    let peft = read_sd_lora(&fx("sd_lora/peft.safetensors")).unwrap();
    let kohya = read_sd_lora(&fx("sd_lora/kohya.safetensors")).unwrap();
    assert_eq!((peft.format, kohya.format), ("diffusers", "kohya"));
    assert_eq!(kohya.modules.len(), 45);
    for (case, files) in [
        ("base", vec![]),
        ("peft", vec![(&peft, 1.0)]),
        ("kohya", vec![(&kohya, 1.0)]),
        ("both", vec![(&peft, 1.0), (&kohya, 0.8)]),
    ] {
        let mut pipe = SdPipeline::open(&fx("sd_pipeline/model")).unwrap();
        for (f, w) in files {
            let rep = merge_sd_lora(&mut pipe, f, w, false).unwrap();
            assert!(rep.unmatched.is_empty());
            assert_eq!(rep.merged.values().sum::<usize>(), f.modules.len());
        }
        let (want, _) = r.read_f32(&format!("{case}.images")).unwrap();
        let e = worst(&images(&pipe), &want);
        eprintln!("{case}: worst pixel difference {e:.2e}");
        assert!(e < 1e-5, "{case}: {e:.2e}");
    }
}

#[test]
fn text_encoder_loras_give_peft_states() {
    let r = SafetensorsFile::open(fx("sd_lora/reference.safetensors")).unwrap();
    for case in ["te_peft", "te_kohya"] {
        let mut pipe = SdPipeline::open(&fx("sd_pipeline/model")).unwrap();
        let f = read_sd_lora(&fx(&format!("sd_lora/{case}.safetensors"))).unwrap();
        let rep = merge_sd_lora(&mut pipe, &f, 1.0, false).unwrap();
        assert_eq!(rep.merged.get("text_encoder"), Some(&f.modules.len()));
        let got = pipe
            .encode_prompts(&PROMPTS, 0)
            .unwrap()
            .try_to_vec()
            .unwrap();
        let (want, _) = r.read_f32(&format!("{case}.states")).unwrap();
        let e = worst(&got, &want);
        eprintln!("{case}: worst difference {e:.2e}");
        assert!(e < 2e-5, "{case}: {e:.2e}");
    }
}

#[test]
fn bad_lora_files_are_named_errors() {
    use lora_io::write::{write_safetensors, OutDtype, OutTensor};
    let tmp = std::env::temp_dir().join(format!("lora-sd-lora-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let write = |name: &str, tensors: &[(&str, Vec<usize>)]| {
        let vals: Vec<Vec<f32>> = tensors
            .iter()
            .map(|(k, s)| {
                // Alphas are written as 0 (kohya's "alpha = rank"), weights as 0.01.
                let v = if k.ends_with(".alpha") { 0.0 } else { 0.01 };
                vec![v; s.iter().product()]
            })
            .collect();
        let ts: Vec<OutTensor> = tensors
            .iter()
            .zip(&vals)
            .map(|((k, s), v)| OutTensor {
                name: k.to_string(),
                shape: s.clone(),
                values: v,
                dtype: OutDtype::F32,
            })
            .collect();
        let p = tmp.join(name);
        write_safetensors(&p, &ts, Default::default()).unwrap();
        p
    };
    let q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    type Case<'a> = (&'a str, Vec<(String, Vec<usize>)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "dora",
            vec![(format!("{q}.dora_scale"), vec![16, 1])],
            "DoRA magnitude without any weights",
        ),
        (
            "peft_dora",
            vec![(
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector".into(),
                vec![16],
            )],
            "DoRA magnitude without any weights",
        ),
        (
            "dora_shape",
            vec![
                (format!("{q}.lora_down.weight"), vec![2, 16]),
                (format!("{q}.lora_up.weight"), vec![16, 2]),
                (format!("{q}.dora_scale"), vec![16]),
            ],
            "a DoRA magnitude is",
        ),
        (
            "loha",
            vec![(format!("{q}.hada_w1_a"), vec![16, 2])],
            "hada_w1_b",
        ),
        (
            "scalar_factor",
            vec![
                (format!("{q}.hada_w1_a"), vec![16, 2]),
                (format!("{q}.hada_w1_b"), vec![]),
                (format!("{q}.hada_w2_a"), vec![16, 2]),
                (format!("{q}.hada_w2_b"), vec![2, 16]),
            ],
            "hada_w1_b` has shape []",
        ),
        (
            "lokr_half",
            vec![(format!("{q}.lokr_w2"), vec![4, 4])],
            "needs lokr_w1",
        ),
        (
            "bad_mid",
            vec![
                (format!("{q}.lora_down.weight"), vec![2, 16, 1, 1]),
                (format!("{q}.lora_mid.weight"), vec![4, 1, 3, 3]),
                (format!("{q}.lora_up.weight"), vec![16, 2, 1, 1]),
            ],
            "lora_mid's first dimension",
        ),
        (
            "mixed",
            vec![
                (format!("{q}.lora_down.weight"), vec![2, 16]),
                (format!("{q}.lora_up.weight"), vec![16, 2]),
                (format!("{q}.hada_w1_a"), vec![16, 2]),
            ],
            "mixes",
        ),
        (
            "half",
            vec![(format!("{q}.lora_down.weight"), vec![2, 16])],
            "both its down",
        ),
        (
            "rank",
            vec![
                (format!("{q}.lora_down.weight"), vec![2, 16]),
                (format!("{q}.lora_up.weight"), vec![16, 3]),
            ],
            "low-rank pair",
        ),
        (
            "odd",
            vec![("something.else".into(), vec![1])],
            "not a LoRA key",
        ),
    ];
    for (name, tensors, what) in cases {
        let t: Vec<(&str, Vec<usize>)> = tensors
            .iter()
            .map(|(k, s)| (k.as_str(), s.clone()))
            .collect();
        let p = write(&format!("{name}.safetensors"), &t);
        let e = read_sd_lora(&p).unwrap_err().to_string();
        assert!(e.contains(what) && e.contains(name), "{name}: {e}");
    }
    // Modules that match no layer: an error listing them, or (allowed) a count; nothing is
    // merged when the file does not fit.
    let p = write(
        "unmatched.safetensors",
        &[
            (&format!("{q}.lora_down.weight"), vec![2, 16]),
            (&format!("{q}.lora_up.weight"), vec![16, 2]),
            ("lora_unet_no_such_module.lora_down.weight", vec![2, 16]),
            ("lora_unet_no_such_module.lora_up.weight", vec![16, 2]),
        ],
    );
    let f = read_sd_lora(&p).unwrap();
    let mut pipe = SdPipeline::open(&fx("sd_pipeline/model")).unwrap();
    let e = merge_sd_lora(&mut pipe, &f, 1.0, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no_such_module") && e.contains("--allow-unmatched"),
        "{e}"
    );
    let rep = merge_sd_lora(&mut pipe, &f, 1.0, true).unwrap();
    assert_eq!(rep.unmatched.len(), 1);
    assert_eq!(rep.merged.get("unet"), Some(&1));
    // kohya's rule: a zero alpha means alpha = rank (scale 1).
    let p = write(
        "alpha0.safetensors",
        &[
            (&format!("{q}.lora_down.weight"), vec![2, 16]),
            (&format!("{q}.lora_up.weight"), vec![16, 2]),
            (&format!("{q}.alpha"), vec![]),
        ],
    );
    let f = read_sd_lora(&p).unwrap();
    assert_eq!(f.modules[0].scale, 1.0);
    std::fs::remove_dir_all(&tmp).ok();
}

/// `lora inspect`'s report of an SD LoRA file: format, blocks, kinds, and each update's norm
/// equal to `|scale * up @ down|_F` formed directly.
#[test]
fn inspect_reports_sd_lora_blocks_and_norms() {
    use lora_io::inspect::{inspect, Report};
    let path = fx("sd_lora/kohya.safetensors");
    let Report::SdLora {
        format,
        blocks,
        modules,
        ..
    } = inspect(&path).unwrap()
    else {
        panic!("not reported as an SD LoRA");
    };
    assert_eq!(format, "kohya");
    assert_eq!(modules.len(), 45);
    // make_sd_lora.py: 45 UNet modules, 13 of them convolutions (3x3 conv1s and a
    // downsampler, 1x1 proj_in).
    let convs = modules
        .iter()
        .filter(|m| m.kind.starts_with("conv"))
        .count();
    assert_eq!(convs, 13);
    assert!(modules.iter().any(|m| m.kind == "conv 3x3"));
    assert!(modules.iter().any(|m| m.kind == "conv 1x1"));
    assert!(blocks.iter().any(|b| b.block == "unet mid_block"));
    assert_eq!(blocks.iter().map(|b| b.modules).sum::<usize>(), 45);
    let lora = read_sd_lora(&path).unwrap();
    for (m, info) in lora.modules.iter().zip(&modules) {
        let (up, down) = (
            m.part("lora_up.weight").unwrap(),
            m.part("lora_down.weight").unwrap(),
        );
        let (r, out) = (m.rank(), up.1[0]);
        let inner: usize = down.1[1..].iter().product();
        let mut s = 0.0f64;
        for o in 0..out {
            for i in 0..inner {
                let v: f64 = (0..r)
                    .map(|k| up.0[o * r + k] as f64 * down.0[k * inner + i] as f64)
                    .sum();
                s += v * v;
            }
        }
        let want = m.scale as f64 * s.sqrt();
        assert!(
            (info.norm_delta - want).abs() <= 1e-9 * want.max(1.0),
            "{}",
            m.key
        );
    }
}

/// LyCORIS files (fixtures/parity/make_lycoris.py: modules made by the lycoris-lora library):
/// LoHa (linear, flattened conv, Tucker conv, alpha 0 meaning the rank), LoKr (full and
/// decomposed factors, both decomposed, two full factors at scale 1, conv, Tucker conv) and
/// Tucker LoCon updates equal LyCORIS' `get_diff_weight()`, and merge into the pipeline.
#[test]
fn lycoris_updates_equal_lycoris() {
    let f = read_sd_lora(&fx("sd_lora/lycoris.safetensors")).unwrap();
    assert_eq!(f.format, "kohya");
    let want = SafetensorsFile::open(fx("sd_lora/lycoris_delta.safetensors")).unwrap();
    assert_eq!(f.modules.len(), want.names().len());
    let mut worst = 0.0f64;
    for m in &f.modules {
        let (w, shape) = want.read_f32(&format!("lora_unet_{}", m.key)).unwrap();
        let d = m.delta(&shape).unwrap();
        let scale = w
            .iter()
            .fold(0.0f64, |a, v| a.max(v.abs() as f64))
            .max(1e-6);
        let e = d
            .iter()
            .zip(&w)
            .fold(0.0f64, |a, (x, y)| a.max((x - *y as f64).abs()))
            / scale;
        assert!(e < 1e-5, "{} ({:?}): {e:.2e}", m.key, m.kind);
        worst = worst.max(e);
    }
    eprintln!("LyCORIS updates: worst relative difference {worst:.2e}");
    let kinds: Vec<_> = f.modules.iter().map(|m| m.kind).collect();
    use lora_io::sd_lora::Kind;
    for k in [Kind::Lora, Kind::LoHa, Kind::LoKr] {
        assert!(kinds.contains(&k), "{k:?}");
    }
    let mut pipe = SdPipeline::open(&fx("sd_pipeline/model")).unwrap();
    let rep = merge_sd_lora(&mut pipe, &f, 0.5, false).unwrap();
    assert_eq!(rep.merged.get("unet"), Some(&f.modules.len()));
}

/// LyCORIS DoRA (fixtures/parity/make_lycoris_dora.py: `weight_decompose=True` LoCon, LoHa and
/// LoKr modules, magnitudes per output row and per input column, linear and convolution layers):
/// the merged weights equal LyCORIS' at multipliers 1 and 0.6.
#[test]
fn lycoris_dora_merges_equal_lycoris() {
    let f = read_sd_lora(&fx("sd_lora/lycoris_dora.safetensors")).unwrap();
    assert_eq!(f.modules.len(), 7);
    assert!(f.modules.iter().all(|m| m.dora_scale.is_some()));
    let want = SafetensorsFile::open(fx("sd_lora/lycoris_dora_merged.safetensors")).unwrap();
    let mut worst = 0.0f64;
    for mult in [1.0f32, 0.6] {
        let mut pipe = SdPipeline::open(&fx("sd_pipeline/model")).unwrap();
        let rep = merge_sd_lora(&mut pipe, &f, mult, false).unwrap();
        assert_eq!(rep.layers.len(), 7);
        let mut layers: Vec<(String, Vec<f32>)> = Vec::new();
        for (n, l) in pipe.unet.linears() {
            layers.push((n, l.base().0.try_to_vec().unwrap()));
        }
        for (n, c) in pipe.unet.convs() {
            layers.push((n, c.base().0.try_to_vec().unwrap()));
        }
        for m in &f.modules {
            let (w, _) = want
                .read_f32(&format!("lora_unet_{}@{mult:?}", m.key))
                .unwrap();
            let got = &layers
                .iter()
                .find(|(n, _)| n.replace('.', "_") == m.key)
                .unwrap()
                .1;
            let scale = w.iter().fold(0.0f64, |a, v| a.max(v.abs() as f64));
            let e = got
                .iter()
                .zip(&w)
                .fold(0.0f64, |a, (x, y)| a.max((*x as f64 - *y as f64).abs()))
                / scale;
            assert!(e < 2e-6, "{} at {mult}: {e:.2e}", m.key);
            worst = worst.max(e);
        }
    }
    eprintln!("LyCORIS DoRA merges: worst relative difference {worst:.2e}");
}

/// PEFT DoRA in a diffusers file (fixtures/parity/make_peft_dora.py: `use_dora=True` on attention
/// projections and 3x3 convolutions, saved by diffusers): merged weights equal diffusers'
/// `load_lora_weights` + `set_adapters` + `fuse_lora` at weights 1 and 0.7.
#[test]
fn peft_dora_merges_equal_diffusers() {
    let f = read_sd_lora(&fx("sd_lora/peft_dora.safetensors")).unwrap();
    assert_eq!(f.format, "diffusers");
    assert!(f.modules.iter().all(|m| m.peft_magnitude.is_some()));
    let want = SafetensorsFile::open(fx("sd_lora/peft_dora_fused.safetensors")).unwrap();
    let mut worst = 0.0f64;
    for w in [1.0f32, 0.7] {
        let mut pipe = SdPipeline::open(&fx("sd_pipeline/model")).unwrap();
        let rep = merge_sd_lora(&mut pipe, &f, w, false).unwrap();
        assert_eq!(rep.layers.len(), f.modules.len());
        let mut layers: std::collections::HashMap<String, Vec<f32>> = Default::default();
        for (n, l) in pipe.unet.linears() {
            layers.insert(n, l.base().0.try_to_vec().unwrap());
        }
        for (n, c) in pipe.unet.convs() {
            layers.insert(n, c.base().0.try_to_vec().unwrap());
        }
        for (_, t) in rep.layers {
            let (v, _) = want.read_f32(&format!("{t}@{w:?}")).unwrap();
            let got = &layers[&t];
            let scale = v.iter().fold(0.0f64, |a, x| a.max(x.abs() as f64));
            let e = got
                .iter()
                .zip(&v)
                .fold(0.0f64, |a, (x, y)| a.max((*x as f64 - *y as f64).abs()))
                / scale;
            assert!(e < 2e-6, "{t} at {w}: {e:.2e}");
            worst = worst.max(e);
        }
    }
    eprintln!("PEFT DoRA merges: worst relative difference {worst:.2e}");
}

/// A diffusers file whose metadata says `use_dora` but whose modules carry no magnitude is
/// refused (PEFT would start one from the weights' norms: not what was trained).
#[test]
fn use_dora_without_magnitudes_is_refused() {
    use lora_io::write::{write_safetensors, OutDtype, OutTensor};
    let p = std::env::temp_dir().join(format!(
        "lora-sd-dora-meta-{}.safetensors",
        std::process::id()
    ));
    let q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let (a, b) = (vec![0.01f32; 2 * 16], vec![0.01f32; 16 * 2]);
    let ts = [
        OutTensor {
            name: format!("{q}.lora_A.weight"),
            shape: vec![2, 16],
            values: &a,
            dtype: OutDtype::F32,
        },
        OutTensor {
            name: format!("{q}.lora_B.weight"),
            shape: vec![16, 2],
            values: &b,
            dtype: OutDtype::F32,
        },
    ];
    let meta = [(
        "lora_adapter_metadata".to_string(),
        r#"{"unet.r": 2, "unet.lora_alpha": 2, "unet.use_dora": true}"#.to_string(),
    )]
    .into_iter()
    .collect();
    write_safetensors(&p, &ts, meta).unwrap();
    let e = read_sd_lora(&p).unwrap_err().to_string();
    assert!(
        e.contains("use_dora") && e.contains("lora_magnitude_vector"),
        "{e}"
    );
    std::fs::remove_file(&p).ok();
}

/// diffusers' older attention-processor names (`attn1.processor.to_q_lora.down.weight`) read as
/// the same modules as the PEFT names, with the same factors and scales.
#[test]
fn attention_processor_names_read_as_module_paths() {
    use lora_io::write::{write_safetensors, OutDtype, OutTensor};
    let src = fx("sd_lora/peft.safetensors");
    let f = SafetensorsFile::open(&src).unwrap();
    let renamed: Vec<(String, Vec<f32>, Vec<usize>)> = f
        .names()
        .iter()
        .map(|k| {
            let (v, s) = f.read_f32(k).unwrap();
            let mut n = k.to_string();
            for (new, old) in [
                ("to_q", "to_q_lora"),
                ("to_k", "to_k_lora"),
                ("to_v", "to_v_lora"),
                ("to_out.0", "to_out_lora"),
            ] {
                for (ab, du) in [("lora_A", "down"), ("lora_B", "up")] {
                    n = n.replace(
                        &format!(".{new}.{ab}.weight"),
                        &format!(".processor.{old}.{du}.weight"),
                    );
                }
            }
            (n, v, s)
        })
        .collect();
    assert!(renamed.iter().all(|(k, _, _)| k.contains(".processor.")));
    let tmp = std::env::temp_dir().join(format!("lora-sd-proc-{}.safetensors", std::process::id()));
    let out: Vec<OutTensor> = renamed
        .iter()
        .map(|(name, v, s)| OutTensor {
            name: name.clone(),
            shape: s.clone(),
            values: v,
            dtype: OutDtype::F32,
        })
        .collect();
    let meta = f.metadata.clone();
    write_safetensors(&tmp, &out, meta).unwrap();
    let (a, b) = (read_sd_lora(&src).unwrap(), read_sd_lora(&tmp).unwrap());
    std::fs::remove_file(&tmp).ok();
    assert_eq!(a.modules.len(), b.modules.len());
    for (x, y) in a.modules.iter().zip(&b.modules) {
        assert_eq!(x.key, y.key);
        assert_eq!(x.scale, y.scale);
        assert_eq!(x.parts, y.parts);
    }
}

/// `lora extract`: from a base pipeline and the same pipeline with the kohya LoCon file merged
/// (ranks 2-4, linear and 1x1/3x3 convolution modules), rank-4 extraction recovers exactly those
/// modules (every other layer is unchanged and left out), and merging the extracted file into
/// the base gives the tuned weights back.
#[test]
fn extract_recovers_a_merged_lora() {
    use lora_io::sd_extract::{extract_sd_lora, write_kohya};
    let model = fx("sd_pipeline/model");
    let f = read_sd_lora(&fx("sd_lora/kohya.safetensors")).unwrap();
    let mut base = SdPipeline::open(&model).unwrap();
    let mut tuned = SdPipeline::open(&model).unwrap();
    merge_sd_lora(&mut tuned, &f, 1.0, false).unwrap();
    let ex = extract_sd_lora(&mut base, &mut tuned, 4, Some(4), 1e-7).unwrap();
    assert_eq!(ex.len(), f.modules.len(), "exactly the changed layers");
    for e in &ex {
        assert!(e.kept > 1.0 - 1e-9, "{}: kept {}", e.name, e.kept);
    }
    // Without --conv-rank the 3x3 convolutions are skipped.
    let no_conv = extract_sd_lora(&mut base, &mut tuned, 4, None, 1e-7).unwrap();
    assert!(no_conv.len() < ex.len());
    let tmp = std::env::temp_dir().join(format!("lora-extract-{}.safetensors", std::process::id()));
    write_kohya(&tmp, &ex).unwrap();
    let back = read_sd_lora(&tmp).unwrap();
    std::fs::remove_file(&tmp).ok();
    let mut again = SdPipeline::open(&model).unwrap();
    merge_sd_lora(&mut again, &back, 1.0, false).unwrap();
    let weights = |p: &mut SdPipeline| -> Vec<Vec<f32>> {
        let (l, c) = p.unet.layers_mut();
        l.into_iter()
            .map(|(_, l)| l.base().0.try_to_vec().unwrap())
            .chain(c.into_iter().map(|(_, c)| c.base().0.try_to_vec().unwrap()))
            .collect()
    };
    let (want, got) = (weights(&mut tuned), weights(&mut again));
    let mut worst = 0.0f32;
    for (w, g) in want.iter().zip(&got) {
        let s = w.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
        worst = worst.max(
            w.iter()
                .zip(g)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
                / s,
        );
    }
    eprintln!("extract -> merge vs merged: worst relative weight difference {worst:.2e}");
    assert!(worst < 1e-5, "{worst:.2e}");
}
