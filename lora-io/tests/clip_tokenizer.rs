//! The CLIP tokenizer built from `vocab.json` + `merges.txt` (no `tokenizer.json`, as Stable
//! Diffusion repositories ship `tokenizer/`) against transformers' CLIPTokenizer
//! (fixtures/parity/make_clip_tokenizer.py): prompts with case, whitespace runs, contractions,
//! punctuation, special-token text, accents, CJK and emoji, digits, the empty prompt and one
//! past 77 tokens, each padded / truncated to 77 ids as the pipelines call it. Bad files are
//! named errors.

use lora_io::clip_tokenizer::ClipTokenizer;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parity/clip_tokenizer")
}

#[test]
fn prompts_encode_as_transformers_encodes_them() {
    let cases: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir().join("cases.json")).unwrap()).unwrap();
    let tok_dir = dir().join("tokenizer");
    assert!(
        !tok_dir.join("tokenizer.json").exists(),
        "the fixture must test the vocab/merges path"
    );
    let tok = ClipTokenizer::from_dir(&tok_dir).unwrap();
    assert_eq!(tok.max_len(), 77);
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 9);
    let mut truncated = false;
    for c in cases {
        let prompt = c["prompt"].as_str().unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            tok.encode_prompt(prompt).unwrap(),
            want,
            "prompt {prompt:?}"
        );
        truncated |= want[76] != want[75] && want[76] == 650;
    }
    assert!(truncated, "one prompt must be long enough to be cut");
}

#[test]
fn bad_tokenizer_files_are_named() {
    let tmp = std::env::temp_dir().join(format!("lora-clip-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let src = dir().join("tokenizer");
    for f in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), tmp.join(f)).unwrap();
    }
    assert!(ClipTokenizer::from_dir(&tmp).is_ok());
    let merges = std::fs::read_to_string(src.join("merges.txt")).unwrap();
    std::fs::write(tmp.join("merges.txt"), format!("{merges}a b c\n")).unwrap();
    let e = ClipTokenizer::from_dir(&tmp).err().unwrap().to_string();
    assert!(e.contains("merges.txt") && e.contains("two symbols"), "{e}");
    std::fs::write(tmp.join("merges.txt"), &merges).unwrap();
    std::fs::write(
        tmp.join("tokenizer_config.json"),
        r#"{"pad_token": "<|nope|>"}"#,
    )
    .unwrap();
    let e = ClipTokenizer::from_dir(&tmp).err().unwrap().to_string();
    assert!(e.contains("<|nope|>"), "{e}");
    std::fs::write(
        tmp.join("tokenizer_config.json"),
        r#"{"model_max_length": 1e30}"#,
    )
    .unwrap();
    let e = ClipTokenizer::from_dir(&tmp).err().unwrap().to_string();
    assert!(e.contains("model_max_length"), "{e}");
    std::fs::remove_file(tmp.join("tokenizer_config.json")).unwrap();
    std::fs::write(tmp.join("vocab.json"), "[1, 2]").unwrap();
    let e = ClipTokenizer::from_dir(&tmp).err().unwrap().to_string();
    assert!(e.contains("vocab.json"), "{e}");
    std::fs::remove_file(tmp.join("vocab.json")).unwrap();
    let e = ClipTokenizer::from_dir(&tmp).err().unwrap().to_string();
    assert!(e.contains("vocab.json"), "{e}");
    std::fs::remove_dir_all(&tmp).ok();
}
