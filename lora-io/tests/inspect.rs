//! `inspect` on an adapter, a model directory and a bare file; the adapter's delta norms agree
//! with `||s B A||_F` formed in full by the LoRA layer.

use lora_io::hf::ModelDir;
use lora_io::inspect::{inspect, Report};
use lora_io::peft::load_adapter;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parity")
}

#[test]
fn adapter_report_matches_the_loaded_layers() {
    let Report::Adapter {
        modules,
        params,
        use_rslora,
        ..
    } = inspect(&root().join("llama_gqa/adapter")).unwrap()
    else {
        panic!("not an adapter")
    };
    assert!(!use_rslora);
    let mut model = ModelDir::open(root().join("llama_gqa/model"))
        .unwrap()
        .load_model()
        .unwrap();
    load_adapter(model.as_mut(), &root().join("llama_gqa/adapter")).unwrap();
    let layers: Vec<_> = model
        .linears()
        .into_iter()
        .filter_map(|(n, l)| l.lora().map(|l| (n, l)))
        .collect();
    assert_eq!(layers.len(), modules.len());
    assert_eq!(
        params,
        layers
            .iter()
            .map(|(_, l)| l.trainable_params())
            .sum::<usize>()
    );
    for m in &modules {
        let (_, l) = layers.iter().find(|(n, _)| *n == m.module).unwrap();
        assert_eq!(m.r, l.config().rank);
        assert_eq!(m.scale, l.scale());
        let full: f64 = l
            .delta_weight()
            .iter()
            .map(|x| (*x as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(
            (m.norm_delta - full).abs() <= 1e-5 * full,
            "{}: {} vs {full}",
            m.module,
            m.norm_delta
        );
    }
    // v_proj has rank 2 and alpha 6 from the patterns.
    let v = modules
        .iter()
        .find(|m| m.module.ends_with("v_proj"))
        .unwrap();
    assert_eq!((v.r, v.alpha, v.scale), (2, 6.0, 3.0));
}

/// A rank past min(out, in) (ten copies of the adapter concatenated: rank 40 on 32-wide layers)
/// takes the product path for the delta norm; the concatenation's update is ten times the
/// adapter's, so its norm is too.
#[test]
fn high_rank_delta_norms() {
    use lora_io::combine::{combine, write, AdapterWeights, Combination};
    let one = AdapterWeights::read(&root().join("llama_gqa/adapter")).unwrap();
    let copies = vec![one; 10];
    let (cfg, cat) = combine(&copies, &[1.0; 10], Combination::Cat).unwrap();
    let dir = std::env::temp_dir().join(format!("lora-io-inspect-{}-cat", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write(&dir, &cfg, &cat).unwrap();
    let (Report::Adapter { modules: big, .. }, Report::Adapter { modules: base, .. }) = (
        inspect(&dir).unwrap(),
        inspect(&root().join("llama_gqa/adapter")).unwrap(),
    ) else {
        panic!("not adapters")
    };
    assert!(
        cat.values().any(|f| f.r * f.r > f.out * f.inp),
        "some module takes the product path"
    );
    for m in &big {
        let b = base.iter().find(|b| b.module == m.module).unwrap();
        assert!(
            (m.norm_delta - 10.0 * b.norm_delta).abs() <= 1e-5 * m.norm_delta,
            "{}: {} vs 10 x {}",
            m.module,
            m.norm_delta,
            b.norm_delta
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn model_and_file_reports() {
    let Report::Model {
        params,
        linear_modules,
        architecture,
        ..
    } = inspect(&root().join("gpt2/model")).unwrap()
    else {
        panic!()
    };
    assert_eq!(params, 38400 - 2304, "PEFT's all-params minus the adapter");
    assert_eq!(linear_modules.len(), 8);
    assert!(architecture.starts_with("gpt2: 2 layers"));
    let Report::File {
        tensors, metadata, ..
    } = inspect(&root().join("gpt2/adapter/adapter_model.safetensors")).unwrap()
    else {
        panic!()
    };
    assert_eq!(tensors.len(), 8);
    assert_eq!(metadata.get("format").map(String::as_str), Some("pt"));
    assert!(inspect(&root().join("nope.safetensors")).is_err());
}
