//! Combining adapters against PEFT's own `add_weighted_adapter` outputs
//! (`fixtures/parity/llama_gqa/combined/{cat,linear,svd}`, weights 0.7 and -1.3 on two adapters
//! with different targets and ranks): cat and linear factors equal PEFT's; svd gives PEFT's
//! update `B @ A` (the factors themselves are unique only up to signs).

use lora_io::combine::{combine, write, AdapterWeights, Combination, Factors};
use lora_io::hf::ModelDir;
use lora_io::peft::load_adapter;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parity/llama_gqa")
}

fn inputs() -> Vec<AdapterWeights> {
    vec![
        AdapterWeights::read(&root().join("adapter")).unwrap(),
        AdapterWeights::read(&root().join("adapter2")).unwrap(),
    ]
}

/// The factors as stored, without checking them against the config: PEFT's `linear` file is
/// one its own loader (and ours) refuses, and it is compared here tensor by tensor.
fn raw_factors(dir: &std::path::Path) -> std::collections::BTreeMap<String, Factors> {
    let file =
        lora_io::safetensors::SafetensorsFile::open(dir.join("adapter_model.safetensors")).unwrap();
    let mut out = std::collections::BTreeMap::new();
    for k in file.names() {
        let Some(m) = k
            .strip_prefix("base_model.model.")
            .and_then(|x| x.strip_suffix(".lora_A.weight"))
        else {
            continue;
        };
        let (a, ash) = file.read_f32(k).unwrap();
        let (b, bsh) = file
            .read_f32(&format!("base_model.model.{m}.lora_B.weight"))
            .unwrap();
        out.insert(
            m.to_string(),
            Factors {
                a,
                b,
                r: ash[0],
                inp: ash[1],
                out: bsh[0],
                scale: 1.0,
            },
        );
    }
    out
}

fn product(f: &Factors) -> Vec<f64> {
    let mut d = vec![0.0; f.out * f.inp];
    for o in 0..f.out {
        for i in 0..f.inp {
            d[o * f.inp + i] = (0..f.r)
                .map(|j| f.b[o * f.r + j] as f64 * f.a[j * f.inp + i] as f64)
                .sum();
        }
    }
    d
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let s = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        / s
}

#[test]
fn cat_and_linear_equal_peft_factors() {
    for (how, dir, rank) in [
        (Combination::Cat, "cat", 8),
        (Combination::Linear, "linear", 4),
    ] {
        let (cfg, ours) = combine(&inputs(), &[0.7, -1.3], how).unwrap();
        assert_eq!((cfg.r, cfg.lora_alpha), (rank, rank as f32));
        let peft = raw_factors(&root().join("combined").join(dir));
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            peft.keys().collect::<Vec<_>>(),
            "{dir}: modules"
        );
        for (m, f) in &ours {
            let p = &peft[m];
            assert_eq!((f.r, f.inp, f.out), (p.r, p.inp, p.out), "{dir} {m}: shape");
            assert!(
                max_rel(&f.a, &p.a) < 1e-6 && max_rel(&f.b, &p.b) < 1e-6,
                "{dir} {m}: factors differ"
            );
        }
    }
}

#[test]
fn svd_equals_peft_update() {
    let (cfg, ours) = combine(&inputs(), &[0.7, -1.3], Combination::Svd { rank: Some(3) }).unwrap();
    assert_eq!(cfg.r, 3);
    let peft = AdapterWeights::read(&root().join("combined/svd")).unwrap();
    for (m, f) in &ours {
        let p = &peft.modules[m];
        let (x, y) = (product(f), product(p));
        let s = y.iter().fold(1e-9f64, |a, v| a.max(v.abs()));
        let e = x
            .iter()
            .zip(&y)
            .fold(0.0f64, |a, (u, v)| a.max((u - v).abs()))
            / s;
        assert!(e < 1e-4, "svd {m}: B@A relative error {e:e}");
    }
    // With the full rank, svd reproduces the exact weighted sum (= cat).
    let (_, full) = combine(&inputs(), &[0.7, -1.3], Combination::Svd { rank: Some(8) }).unwrap();
    let (_, cat) = combine(&inputs(), &[0.7, -1.3], Combination::Cat).unwrap();
    for (m, f) in &full {
        let (x, y) = (product(f), product(&cat[m]));
        let s = y.iter().fold(1e-9f64, |a, v| a.max(v.abs()));
        let e = x
            .iter()
            .zip(&y)
            .fold(0.0f64, |a, (u, v)| a.max((u - v).abs()))
            / s;
        assert!(e < 1e-5, "full-rank svd {m}: {e:e}");
    }
    // A rank past a layer's min(out, in) is refused (it only padded the file with zeros: a
    // 3 GB adapter for --rank 100000 on the demo model), naming the layer.
    let e = combine(
        &inputs(),
        &[0.7, -1.3],
        Combination::Svd { rank: Some(1000) },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("svd rank 1000 exceeds min(out, in) = "), "{e}");
}

#[test]
fn combined_adapters_load_and_peft_subfolders_read() {
    let model_dir = root().join("model");
    for how in [
        Combination::Cat,
        Combination::Linear,
        Combination::Svd { rank: None },
    ] {
        let (cfg, ours) = combine(&inputs(), &[0.7, -1.3], how).unwrap();
        let out =
            std::env::temp_dir().join(format!("lora-io-combine-{}-{how:?}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        write(&out, &cfg, &ours).unwrap();
        let mut m = ModelDir::open(&model_dir).unwrap().load_model().unwrap();
        load_adapter(m.as_mut(), &out).unwrap_or_else(|e| panic!("{how:?}: {e}"));
    }
    // PEFT's own sub-folder saves (save_pretrained(selected_adapters=...)).
    for sub in ["cat", "svd"] {
        let mut m = ModelDir::open(&model_dir).unwrap().load_model().unwrap();
        load_adapter(m.as_mut(), &root().join("combined").join(sub)).unwrap();
    }
    // PEFT's linear result for a module only one adapter has keeps that adapter's rank while
    // its config says r=4 with no rank_pattern: a file PEFT itself cannot reload. Refused with
    // the key named (ours records the rank in rank_pattern instead).
    let mut m = ModelDir::open(&model_dir).unwrap().load_model().unwrap();
    let e = load_adapter(m.as_mut(), &root().join("combined/linear"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("v_proj.lora_A.weight`: shape [2, 32]"), "{e}");
    // Unequal ranks cannot be combined linearly.
    let two = AdapterWeights::read(&root().join("adapter2")).unwrap();
    let mut r2 = two.clone();
    r2.config.r = 2;
    assert!(combine(&[two, r2], &[1.0, 1.0], Combination::Linear)
        .unwrap_err()
        .to_string()
        .contains("equal ranks"));
}
