//! PEFT's module-matching rules, on the Llama fixture's module paths: list entries match exactly
//! or as a dotted suffix, a string is a full-match regex, `all-linear` skips the output head,
//! `exclude_modules`, `layers_to_transform`, and `rank_pattern`/`alpha_pattern` by path suffix.

use lora_core::models::CausalLm;
use lora_io::hf::ModelDir;
use lora_io::peft::{inject, PeftConfig};
use serde_json::json;
use std::path::{Path, PathBuf};

fn model() -> Box<dyn CausalLm> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parity/llama_gqa/model");
    ModelDir::open(p).unwrap().load_model().unwrap()
}

fn chosen(cfg: serde_json::Value) -> Vec<String> {
    let cfg = PeftConfig::from_json(Path::new("adapter_config.json"), &cfg).unwrap();
    let mut m = model();
    inject(m.as_mut(), &cfg, 0).unwrap()
}

#[test]
fn list_regex_all_linear_exclude_and_layers() {
    let c = chosen(json!({"r": 2, "target_modules": ["q_proj", "model.layers.1.mlp.down_proj"]}));
    assert_eq!(
        c,
        [
            "model.layers.0.self_attn.q_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.mlp.down_proj"
        ]
    );
    // A suffix must end at a dot: "proj" alone matches nothing.
    let cfg = PeftConfig::from_json(
        Path::new("a.json"),
        &json!({"r": 2, "target_modules": ["proj"]}),
    )
    .unwrap();
    let e = inject(model().as_mut(), &cfg, 0).unwrap_err().to_string();
    assert!(
        e.contains("matched no module; available modules: model.layers.0.self_attn.q_proj"),
        "{e}"
    );

    let c = chosen(json!({"r": 2, "target_modules": r".*\.layers\.0\..*_proj"}));
    assert_eq!(c.len(), 7);
    assert!(c.iter().all(|n| n.starts_with("model.layers.0.")));
    // Regex must match the whole path.
    let cfg = PeftConfig::from_json(
        Path::new("a.json"),
        &json!({"r": 2, "target_modules": "q_proj"}),
    )
    .unwrap();
    assert!(inject(model().as_mut(), &cfg, 0).is_err());

    let c = chosen(json!({"r": 2, "target_modules": "all-linear"}));
    assert_eq!(c.len(), 14, "all-linear must skip lm_head: {c:?}");
    let c = chosen(
        json!({"r": 2, "target_modules": "all-linear", "exclude_modules": ["gate_proj", "up_proj"]}),
    );
    assert_eq!(c.len(), 10);
    let c =
        chosen(json!({"r": 2, "target_modules": ["v_proj", "o_proj"], "layers_to_transform": [1]}));
    assert_eq!(
        c,
        [
            "model.layers.1.self_attn.v_proj",
            "model.layers.1.self_attn.o_proj"
        ]
    );
    let c = chosen(
        json!({"r": 2, "target_modules": ["v_proj"], "layers_to_transform": 0, "layers_pattern": "layers"}),
    );
    assert_eq!(c, ["model.layers.0.self_attn.v_proj"]);
}

#[test]
fn rank_and_alpha_patterns() {
    let cfg = PeftConfig::from_json(
        Path::new("a.json"),
        &json!({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "use_rslora": true,
                "rank_pattern": {"v_proj": 2, "layers.1.self_attn.q_proj": 16}, "alpha_pattern": {"v_proj": 6}}),
    )
    .unwrap();
    let mut m = model();
    inject(m.as_mut(), &cfg, 0).unwrap();
    let ranks: Vec<(String, usize, f32)> = m
        .linears()
        .into_iter()
        .filter_map(|(n, l)| l.lora().map(|l| (n, l.config().rank, l.scale())))
        .collect();
    assert_eq!(
        ranks[0],
        ("model.layers.0.self_attn.q_proj".into(), 4, 8.0 / 2.0)
    );
    assert_eq!(
        ranks[1],
        (
            "model.layers.0.self_attn.v_proj".into(),
            2,
            6.0 / 2f32.sqrt()
        )
    );
    assert_eq!(
        ranks[2],
        ("model.layers.1.self_attn.q_proj".into(), 16, 8.0 / 4.0)
    );
}

#[test]
fn config_fields_are_checked() {
    for (cfg, field) in [
        (json!({"target_modules": ["q_proj"]}), "`r`"),
        (json!({"r": 0, "target_modules": ["q_proj"]}), "`r`"),
        (json!({"r": 2}), "`target_modules`"),
        (json!({"r": 2, "target_modules": 5}), "`target_modules`"),
        (
            json!({"r": 2, "target_modules": ["q"], "lora_dropout": 1.5}),
            "`lora_dropout`",
        ),
        (
            json!({"r": 2, "target_modules": ["q"], "bias": "all"}),
            "`bias`",
        ),
        (
            json!({"r": 2, "target_modules": ["q"], "rank_pattern": {"q": 0}}),
            "`rank_pattern.q`",
        ),
    ] {
        let e = PeftConfig::from_json(Path::new("adapter_config.json"), &cfg)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("adapter_config.json") && e.contains(field),
            "{e}"
        );
    }
}

/// Every case of `fixtures/parity/targets.json`: the modules PEFT itself adapted (with rank and
/// scaling) for a config on the tiny Llama and GPT-2, or the fact that PEFT found no target.
#[test]
fn same_modules_ranks_and_scales_as_peft() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parity");
    let cases = lora_io::hf::read_json(&root.join("targets.json")).unwrap();
    for case in cases.as_array().unwrap() {
        let arch = case["model"].as_str().unwrap();
        let mut m = ModelDir::open(root.join(arch).join("model"))
            .unwrap()
            .load_model()
            .unwrap();
        let cfg = PeftConfig::from_json(Path::new("adapter_config.json"), &case["config"]).unwrap();
        let res = inject(m.as_mut(), &cfg, 0);
        if case.get("error").is_some() {
            assert!(
                res.is_err(),
                "{arch} {}: PEFT found no target, we adapted {:?}",
                case["config"],
                res.unwrap()
            );
            continue;
        }
        res.unwrap_or_else(|e| panic!("{arch} {}: {e}", case["config"]));
        let want = case["modules"].as_object().unwrap();
        let got: Vec<(String, usize, f32)> = m
            .linears()
            .into_iter()
            .filter_map(|(n, l)| l.lora().map(|l| (n, l.config().rank, l.scale())))
            .collect();
        assert_eq!(
            got.len(),
            want.len(),
            "{arch} {}: {got:?} vs {want:?}",
            case["config"]
        );
        for (name, r, s) in got {
            let w = want
                .get(&name)
                .unwrap_or_else(|| panic!("{arch} {}: PEFT did not adapt {name}", case["config"]));
            assert_eq!(r as u64, w["r"].as_u64().unwrap(), "{name} rank");
            assert!(
                (s as f64 - w["scaling"].as_f64().unwrap()).abs() < 1e-6,
                "{name} scaling {s} vs {}",
                w["scaling"]
            );
        }
    }
}
