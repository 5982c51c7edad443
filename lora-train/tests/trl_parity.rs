//! The data pipeline against TRL's `SFTTrainer` (fixtures/trl/reference.json, written by
//! `fixtures/trl/make_trl_reference.py` with trl 1.16.0): `tokenize` with the EOS gives TRL's
//! input ids and labels exactly for `text` and `prompt`/`completion` examples (EOS appended once,
//! completion-only loss, an empty completion trained on its EOS alone).
//!
//! One deliberate difference: TRL tokenizes prompt + completion as one string, so a word split
//! between them merges into one token and the prompt's last token changes (TRL warns that the
//! model then trains on a context it never sees at inference). lora-rs tokenizes the prompt alone,
//! exactly as `lora generate` will see it; the fixture marks that example `boundary_merge`.
//!
//! Conversations (`messages`, and `prompt`/`completion` as message lists) are rendered with two
//! chat templates through `lora_io::chat::ChatTemplate` and must give transformers'
//! `apply_chat_template` text byte for byte and TRL's ids and labels exactly.

use lora_io::chat::ChatTemplate;
use lora_io::tokenizer::TextTokenizer;
use lora_train::batches::{tokenize, Example, Sequence, TokenizeOptions, IGNORE};
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

/// A sequence's ids and labels as TRL writes them (-100 where no loss is taken).
fn as_trl(s: &Sequence) -> (Vec<i64>, Vec<i64>) {
    let ids = s.ids.iter().map(|&x| x as i64).collect();
    let labels = s
        .labels
        .iter()
        .map(|&l| if l == IGNORE { -100 } else { l })
        .collect();
    (ids, labels)
}

#[test]
fn tokenize_matches_trl_sft_trainer() {
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("trl/reference.json")).unwrap())
            .unwrap();
    let (mut compared, mut merged) = (0, 0);
    for (name, t) in r["tokenizers"].as_object().unwrap() {
        let tok =
            TextTokenizer::from_model_dir(root().join("parity").join(name).join("model")).unwrap();
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
            let s = &tokenize(
                &tok,
                std::slice::from_ref(&ex),
                &TokenizeOptions {
                    eos: Some(eos),
                    ..TokenizeOptions::new(4096)
                },
            )
            .unwrap()[0];
            let (ours, labels) = as_trl(s);
            if e["boundary_merge"].as_bool() == Some(true) {
                // The prompt as inference sees it, then the completion and EOS as targets.
                let Example::PromptCompletion { prompt, .. } = &ex else {
                    unreachable!()
                };
                let p = tok.encode(prompt).unwrap();
                assert_eq!(&s.ids[..p.len()], &p[..], "{name}: {e}");
                assert_ne!(
                    ours,
                    ids(&e["input_ids"]),
                    "{name}: the fixture's merge case"
                );
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

#[test]
fn chat_templates_match_transformers_and_trl() {
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("trl/reference.json")).unwrap())
            .unwrap();
    let tokenizers = ["llama_gqa", "gpt2", "gpt2"];
    let mut checked = 0;
    for (c, name) in r["chat"].as_array().unwrap().iter().zip(tokenizers) {
        let tok =
            TextTokenizer::from_model_dir(root().join("parity").join(name).join("model")).unwrap();
        let special = c["special_tokens"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        let t =
            ChatTemplate::new(c["template"].as_str().unwrap(), special, "fixture".into()).unwrap();
        for e in c["examples"].as_array().unwrap() {
            let list = |k: &str| e[k].as_array().unwrap().clone();
            // TRL's `tools` column, a JSON string here (a list of schemas would go through
            // Arrow's typing).
            let tools: Option<Value> = e
                .get("tools")
                .and_then(|t| t.as_str())
                .map(|s| serde_json::from_str(s).unwrap());
            let (ex, all) = match e.get("messages") {
                Some(_) => (
                    Example::Messages {
                        messages: list("messages"),
                        tools: tools.clone(),
                    },
                    list("messages"),
                ),
                None => (
                    Example::ChatPromptCompletion {
                        prompt: list("prompt"),
                        completion: list("completion"),
                        tools: tools.clone(),
                    },
                    [list("prompt"), list("completion")].concat(),
                ),
            };
            let what = format!("{}: {e}", c["template_name"]);
            assert_eq!(
                t.render_with_tools(&all, tools.as_ref(), false).unwrap(),
                e["rendered"].as_str().unwrap(),
                "{what}"
            );
            let s = &tokenize(
                &tok,
                &[ex],
                &TokenizeOptions {
                    eos: Some(0),
                    chat: Some(&t),
                    ..TokenizeOptions::new(4096)
                },
            )
            .unwrap()[0];
            let (ours, labels) = as_trl(s);
            assert_eq!(ours, ids(&e["input_ids"]), "ids, {what}");
            assert_eq!(labels, ids(&e["labels"]), "labels, {what}");
            checked += 1;
        }
    }
    assert_eq!(checked, 12, "examples checked");
}

/// A template's `raise_exception` and a conversation without a template are errors that say
/// what happened.
#[test]
fn chat_errors_are_named() {
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("trl/reference.json")).unwrap())
            .unwrap();
    let inst = &r["chat"][1];
    let t = ChatTemplate::new(
        inst["template"].as_str().unwrap(),
        [("bos_token".to_string(), "<s>".to_string())].into(),
        "fixture/chat_template.jinja".into(),
    )
    .unwrap();
    let two_users: Vec<Value> = serde_json::from_str(
        r#"[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]"#,
    )
    .unwrap();
    let e = t.render(&two_users, false).unwrap_err().to_string();
    assert!(
        e.contains("fixture/chat_template.jinja") && e.contains("roles must alternate"),
        "{e}"
    );
    let e = ChatTemplate::new("{% if %}", Default::default(), "bad.jinja".into())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("bad.jinja") && e.contains("does not compile"),
        "{e}"
    );
    let tok = TextTokenizer::from_model_dir(root().join("parity/gpt2/model")).unwrap();
    let e = tokenize(
        &tok,
        &[Example::Messages {
            messages: two_users,
            tools: None,
        }],
        &TokenizeOptions::new(64),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("no chat template"), "{e}");
}

/// `assistant_only`: the targets are exactly the assistant turns' content and end-of-turn marker
/// as the ChatML-style fixture template writes them (known from the format, not recomputed), in
/// a multi-turn conversation and in its prompt/completion form; a template whose renderings do
/// not extend each other is refused.
#[test]
fn assistant_only_targets_are_the_assistant_turns() {
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("trl/reference.json")).unwrap())
            .unwrap();
    let c = &r["chat"][0];
    assert_eq!(c["template_name"], "chatml");
    let t = ChatTemplate::new(
        c["template"].as_str().unwrap(),
        Default::default(),
        "f".into(),
    )
    .unwrap();
    let tok = TextTokenizer::from_model_dir(root().join("parity/llama_gqa/model")).unwrap();
    let conv = c["examples"][1]["messages"].as_array().unwrap().clone();
    let opts = TokenizeOptions {
        chat: Some(&t),
        assistant_only: true,
        ..TokenizeOptions::new(4096)
    };
    // The decoded runs of consecutive targets.
    let runs = |s: &Sequence| -> Vec<String> {
        let mut out: Vec<Vec<u32>> = Vec::new();
        let mut prev = false;
        for (&id, &l) in s.ids.iter().zip(&s.labels) {
            let on = l != IGNORE;
            if on && !prev {
                out.push(Vec::new());
            }
            if on {
                out.last_mut().unwrap().push(id);
            }
            prev = on;
        }
        out.iter().map(|ids| tok.decode(ids).unwrap()).collect()
    };
    let s = &tokenize(
        &tok,
        &[Example::Messages {
            messages: conv.clone(),
            tools: None,
        }],
        &opts,
    )
    .unwrap()[0];
    assert_eq!(runs(s), ["one two<|im_end|>\n", "three<|im_end|>\n"]);
    let all = &tokenize(
        &tok,
        &[Example::Messages {
            messages: conv.clone(),
            tools: None,
        }],
        &TokenizeOptions {
            assistant_only: false,
            ..opts
        },
    )
    .unwrap()[0];
    assert_eq!(s.ids, all.ids, "the same tokens, fewer targets");
    let pc = Example::ChatPromptCompletion {
        prompt: conv[..3].to_vec(),
        completion: conv[3..].to_vec(),
        tools: None,
    };
    let s = &tokenize(&tok, &[pc], &opts).unwrap()[0];
    assert_eq!(runs(s), ["three<|im_end|>\n"]);
    // A template that numbers the conversation up front renders `..i` and `..=i` differently.
    let bad = ChatTemplate::new(
        "{{ messages | length }}{% for m in messages %}{{ m.content }}{% endfor %}",
        Default::default(),
        "bad".into(),
    )
    .unwrap();
    let e = tokenize(
        &tok,
        &[Example::Messages {
            messages: conv,
            tools: None,
        }],
        &TokenizeOptions {
            chat: Some(&bad),
            ..opts
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("example 1") && e.contains("--assistant-only-loss"),
        "{e}"
    );
}

/// The `tools` column as TRL reads it: a list of definitions or a JSON string of one, with
/// conversations only; anything else is refused with the line.
#[test]
fn tools_column_is_read_as_trl_reads_it() {
    use lora_train::data::read_examples;
    let dir = std::env::temp_dir().join(format!("lora-tools-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("d.jsonl");
    let msg = r#""messages": [{"role": "user", "content": "hi"}]"#;
    std::fs::write(
        &p,
        format!(
            "{{{msg}, \"tools\": [{{\"name\": \"f\"}}]}}\n{{{msg}, \"tools\": \"[{{\\\"name\\\": \\\"f\\\"}}]\"}}\n{{{msg}}}\n"
        ),
    )
    .unwrap();
    let ex = read_examples(&p).unwrap();
    let tools: Vec<Option<Value>> = ex
        .iter()
        .map(|e| match e {
            Example::Messages { tools, .. } => tools.clone(),
            _ => panic!("{e:?}"),
        })
        .collect();
    let f: Value = serde_json::from_str(r#"[{"name": "f"}]"#).unwrap();
    assert_eq!(tools, [Some(f.clone()), Some(f), None]);
    for (line, needle) in [
        (
            format!("{{{msg}, \"tools\": {{\"name\": \"f\"}}}}"),
            "must be a list",
        ),
        (format!("{{{msg}, \"tools\": \"[oops\"}}"), "not JSON"),
        (
            r#"{"text": "a", "tools": []}"#.to_string(),
            "`tools` goes with conversations",
        ),
    ] {
        std::fs::write(&p, line).unwrap();
        let e = read_examples(&p).unwrap_err().to_string();
        assert!(
            e.contains("d.jsonl") && e.contains("line 1") && e.contains(needle),
            "{e}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
