//! Where a model directory's chat template comes from (`chat_template.jinja` first, then
//! `tokenizer_config.json`'s `chat_template` as a string or a named list) and the special tokens
//! the template sees; malformed entries are errors naming the file and field.

use lora_io::chat::ChatTemplate;
use serde_json::json;
use std::path::PathBuf;

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lora-io-chat-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn msgs() -> Vec<serde_json::Value> {
    vec![json!({"role": "user", "content": "hi"})]
}

#[test]
fn template_sources_and_special_tokens() {
    let d = dir("sources");
    assert!(
        ChatTemplate::from_model_dir(&d).unwrap().is_none(),
        "no template anywhere"
    );
    let cfg = d.join("tokenizer_config.json");
    // A string, with special tokens written both ways.
    std::fs::write(
        &cfg,
        json!({"chat_template": "{{ bos_token }}|{{ messages[0].content }}|{{ eos_token }}",
               "bos_token": "<s>", "eos_token": {"content": "</s>", "lstrip": false}})
        .to_string(),
    )
    .unwrap();
    let t = ChatTemplate::from_model_dir(&d).unwrap().unwrap();
    assert_eq!(t.render(&msgs(), false).unwrap(), "<s>|hi|</s>");
    assert_eq!(t.origin(), cfg.as_path());
    // `tools` and `documents` are None, as transformers passes them (an undefined variable
    // would pass `is not none`).
    std::fs::write(
        &cfg,
        json!({"chat_template": "{{ tools is not none }}{{ documents is none }}"}).to_string(),
    )
    .unwrap();
    let t = ChatTemplate::from_model_dir(&d).unwrap().unwrap();
    assert_eq!(t.render(&msgs(), false).unwrap(), "FalseTrue");
    // A list of named templates: `default` is used.
    std::fs::write(
        &cfg,
        json!({"chat_template": [{"name": "tool_use", "template": "T"},
                                 {"name": "default", "template": "D{{ add_generation_prompt }}"}]})
        .to_string(),
    )
    .unwrap();
    let t = ChatTemplate::from_model_dir(&d).unwrap().unwrap();
    assert_eq!(
        t.render(&msgs(), true).unwrap(),
        "DTrue",
        "as Python prints True"
    );
    // chat_template.jinja wins over tokenizer_config.json (transformers 5 writes it).
    std::fs::write(d.join("chat_template.jinja"), "J{{ messages | length }}\n").unwrap();
    let t = ChatTemplate::from_model_dir(&d).unwrap().unwrap();
    assert_eq!(
        t.render(&msgs(), false).unwrap(),
        "J1",
        "trailing newline dropped, as jinja2"
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn malformed_templates_are_named() {
    let d = dir("bad");
    let cfg = d.join("tokenizer_config.json");
    for (v, needle) in [
        (json!({"chat_template": 3}), "expected a string or a list"),
        (
            json!({"chat_template": [{"name": "x", "template": "T"}]}),
            "without one named `default`",
        ),
        (json!({"chat_template": "{% for %}"}), "does not compile"),
    ] {
        std::fs::write(&cfg, v.to_string()).unwrap();
        let e = ChatTemplate::from_model_dir(&d).unwrap_err().to_string();
        assert!(
            e.contains("tokenizer_config.json")
                && e.contains("chat_template")
                && e.contains(needle),
            "{e}"
        );
    }
    // Rendering errors name the template's file too (an undefined method here).
    std::fs::write(
        &cfg,
        json!({"chat_template": "{{ messages.nope() }}"}).to_string(),
    )
    .unwrap();
    let e = ChatTemplate::from_model_dir(&d)
        .unwrap()
        .unwrap()
        .render(&msgs(), false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tokenizer_config.json") && e.contains("rendering failed"),
        "{e}"
    );
    std::fs::remove_dir_all(&d).unwrap();
}
