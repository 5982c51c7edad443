//! Long texts are encoded from a prefix (when only the first tokens are kept) or in pieces
//! (packing), with exactly the tokens a whole encoding gives: checked on the fixture tokenizers
//! (byte-level BPE, with and without a post-processor that adds BOS), the demo's word-level
//! one, and one with a normalizer (which must fall back to a whole encoding).

use lora_io::tokenizer::{TextTokenizer, PIECE_BYTES};
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A piece and a quarter of mixed text (one cut): words, numbers, punctuation, runs of spaces and newlines,
/// accents and CJK.
fn long_text() -> String {
    let words = [
        "the",
        "cat",
        "sees",
        "a",
        "dog",
        "12345",
        "it's",
        "caf\u{e9}",
        "\u{4f60}\u{597d}",
        "!!!",
        "...",
        "  two",
        "\n\nnew",
        "tab\tbed",
        "the",
        "cat",
        "is",
        "here",
    ];
    let mut s = String::new();
    let mut i = 0u64;
    while s.len() < PIECE_BYTES * 5 / 4 {
        i = i
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        s.push_str(words[(i >> 33) as usize % words.len()]);
        s.push(' ');
    }
    s
}

fn check(tok: &TextTokenizer, text: &str, what: &str) {
    for special in [true, false] {
        let whole = if special {
            tok.encode(text).unwrap()
        } else {
            tok.encode_plain(text).unwrap()
        };
        assert_eq!(
            tok.encode_long(text, special, None).unwrap(),
            whole,
            "{what}: pieces, special {special}"
        );
        for n in [1, 33, 5000] {
            assert_eq!(
                tok.encode_long(text, special, Some(n)).unwrap(),
                whole[..n],
                "{what}: prefix {n}, special {special}"
            );
        }
    }
}

#[test]
fn long_texts_encode_as_a_whole_encoding_does() {
    let text = long_text();
    for dir in [
        "fixtures/parity/gpt2/model",
        "fixtures/parity/llama_gqa/model",
        "demo/base",
    ] {
        let tok = TextTokenizer::from_model_dir(root().join(dir)).unwrap();
        check(&tok, &text, dir);
    }
    // A normalizer that prepends to every encoded string would change the tokens at each cut:
    // such a tokenizer encodes the text whole.
    let mut j: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("fixtures/parity/gpt2/model/tokenizer.json")).unwrap(),
    )
    .unwrap();
    j["normalizer"] = serde_json::json!({"type": "Prepend", "prepend": "x"});
    let p = std::env::temp_dir().join(format!("lora-io-long-{}.json", std::process::id()));
    std::fs::write(&p, j.to_string()).unwrap();
    let tok = TextTokenizer::open(&p).unwrap();
    check(&tok, &text, "prepend normalizer");
    let _ = std::fs::remove_file(&p);
}
