//! The data pipeline against TRL's `SFTTrainer` (fixtures/trl/reference.json, written by
//! `fixtures/trl/make_trl_reference.py` with trl 1.16.0): `tokenize` with the EOS gives TRL's
//! input ids and labels exactly for `text` and `prompt`/`completion` examples (EOS appended once,
//! completion-only loss, an empty completion trained on its EOS alone).
//!
//! One deliberate difference: TRL tokenizes prompt + completion as one string, so a word split
//! between them merges into one token and the prompt's last token changes (TRL warns that the
//! model then trains on a context it never sees at inference). lora-rs tokenizes the prompt alone,
//! exactly as `lora generate` will see it; the fixture marks that example `boundary_merge`.

use lora_io::tokenizer::TextTokenizer;
use lora_train::batches::{tokenize, Example, IGNORE};
use serde_json::Value;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

#[test]
fn tokenize_matches_trl_sft_trainer() {
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("trl/reference.json")).unwrap())
            .unwrap();
    let (mut compared, mut merged) = (0, 0);
    for (name, t) in r["tokenizers"].as_object().unwrap() {
        let tok = TextTokenizer::from_model_dir(root().join("parity").join(name).join("model"))
            .unwrap();
        let eos = t["eos_token_id"].as_u64().unwrap() as u32;
        assert_eq!(tok.token_id(t["eos_token"].as_str().unwrap()), Some(eos));
        for e in t["examples"].as_array().unwrap() {
            let ex = match (e.get("text"), e.get("prompt"), e.get("completion")) {
                (Some(t), _, _) => Example::Text(t.as_str().unwrap().into()),
                (_, Some(p), Some(c)) => Example::PromptCompletion {
                    prompt: p.as_str().unwrap().into(),
                    completion: c.as_str().unwrap().into(),
                },
                _ => panic!("{e}"),
            };
            let s = &tokenize(&tok, std::slice::from_ref(&ex), 4096, false, Some(eos)).unwrap()[0];
            let ours: Vec<i64> = s.ids.iter().map(|&x| x as i64).collect();
            let labels: Vec<i64> = s
                .labels
                .iter()
                .map(|&l| if l == IGNORE { -100 } else { l })
                .collect();
            if e["boundary_merge"].as_bool() == Some(true) {
                // The prompt as inference sees it, then the completion and EOS as targets.
                let Example::PromptCompletion { prompt, .. } = &ex else {
                    unreachable!()
                };
                let p = tok.encode(prompt).unwrap();
                assert_eq!(&s.ids[..p.len()], &p[..], "{name}: {e}");
                assert_ne!(ours, ids(&e["input_ids"]), "{name}: the fixture's merge case");
                assert!(labels[..p.len()].iter().all(|&l| l == -100));
                assert_eq!(*labels.last().unwrap(), eos as i64);
                merged += 1;
                continue;
            }
            assert_eq!(ours, ids(&e["input_ids"]), "{name}: input ids of {e}");
            assert_eq!(labels, ids(&e["labels"]), "{name}: labels of {e}");
            compared += 1;
        }
    }
    assert_eq!((compared, merged), (16, 2), "examples checked");
}
