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

/// `strftime_now` formats as Python's `time.strftime(fmt, time.gmtime(secs))`: the expected
/// strings below were printed by Python 3.11 for these instants (epoch, before it, leap days,
/// a year's last day, 2100, a noon); an unknown code is an error.
#[test]
fn strftime_matches_python() {
    use lora_io::chat::strftime;
    let fmt = "%Y-%y-%m-%d|%e|%b %h %B|%a %A|%j|%H %I %p %M %S|%%";
    for (secs, want) in [
        (
            0,
            "1970-70-01-01| 1|Jan Jan January|Thu Thursday|001|00 12 AM 00 00|%",
        ),
        (
            -1,
            "1969-69-12-31|31|Dec Dec December|Wed Wednesday|365|23 11 PM 59 59|%",
        ),
        (
            951782400,
            "2000-00-02-29|29|Feb Feb February|Tue Tuesday|060|00 12 AM 00 00|%",
        ),
        (
            951868799,
            "2000-00-02-29|29|Feb Feb February|Tue Tuesday|060|23 11 PM 59 59|%",
        ),
        (
            1709251199,
            "2024-24-02-29|29|Feb Feb February|Thu Thursday|060|23 11 PM 59 59|%",
        ),
        (
            1735689599,
            "2024-24-12-31|31|Dec Dec December|Tue Tuesday|366|23 11 PM 59 59|%",
        ),
        (
            4102444800,
            "2100-00-01-01| 1|Jan Jan January|Fri Friday|001|00 12 AM 00 00|%",
        ),
        (
            1234567890,
            "2009-09-02-13|13|Feb Feb February|Fri Friday|044|23 11 PM 31 30|%",
        ),
        (
            43200,
            "1970-70-01-01| 1|Jan Jan January|Thu Thursday|001|12 12 PM 00 00|%",
        ),
    ] {
        assert_eq!(strftime(fmt, secs).unwrap(), want, "{secs}");
    }
    assert!(strftime("%Q", 0).unwrap_err().contains("%Q"));
    // In a template, with the time pinned as a resumed run pins it.
    let t = ChatTemplate::new(
        "{% if strftime_now is defined %}{{ strftime_now('%d %b %Y') }}{% endif %}",
        Default::default(),
        "t".into(),
    )
    .unwrap();
    t.set_now(1234567890);
    assert_eq!(t.now(), 1234567890);
    assert_eq!(t.render(&msgs(), false).unwrap(), "13 Feb 2009");
}

/// `tojson` with every argument transformers' filter takes writes what Python's `json.dumps`
/// writes (the expected strings were printed by Python 3.11's `json.dumps(v, ensure_ascii=False,
/// **kwargs)` for the same value: key order kept, non-ASCII kept or escaped, indent, sorted keys,
/// custom separators).
#[test]
fn tojson_matches_python_json_dumps() {
    let v = json!({"b": [1, 2, null], "a": "ü\"x\n😀", "c": {"z": 1, "y": []}});
    for (args, want) in [
        ("", "{\"b\": [1, 2, null], \"a\": \"ü\\\"x\\n😀\", \"c\": {\"z\": 1, \"y\": []}}"),
        ("indent=2", "{\n  \"b\": [\n    1,\n    2,\n    null\n  ],\n  \"a\": \"ü\\\"x\\n😀\",\n  \"c\": {\n    \"z\": 1,\n    \"y\": []\n  }\n}"),
        ("sort_keys=true", "{\"a\": \"ü\\\"x\\n😀\", \"b\": [1, 2, null], \"c\": {\"y\": [], \"z\": 1}}"),
        ("separators=[',', ':']", "{\"b\":[1,2,null],\"a\":\"ü\\\"x\\n😀\",\"c\":{\"z\":1,\"y\":[]}}"),
        ("ensure_ascii=true", "{\"b\": [1, 2, null], \"a\": \"\\u00fc\\\"x\\n\\ud83d\\ude00\", \"c\": {\"z\": 1, \"y\": []}}"),
        ("indent=1, sort_keys=true, ensure_ascii=true, separators=[';', '=']", "{\n \"a\"=\"\\u00fc\\\"x\\n\\ud83d\\ude00\";\n \"b\"=[\n  1;\n  2;\n  null\n ];\n \"c\"={\n  \"y\"=[];\n  \"z\"=1\n }\n}"),
    ] {
        let call = if args.is_empty() {
            "{{ messages[0].meta | tojson }}".to_string()
        } else {
            format!("{{{{ messages[0].meta | tojson({args}) }}}}")
        };
        let t = ChatTemplate::new(&call, Default::default(), "t".into()).unwrap();
        let m = vec![json!({"role": "user", "meta": v})];
        assert_eq!(t.render(&m, false).unwrap(), want, "tojson({args})");
    }
}

#[test]
fn a_template_that_runs_away_stops_with_an_error() {
    // Three nested loops of 100000 (10^15 iterations), a loop that prints megabytes per pass,
    // and a recursive macro: each stops on the render budget within a second, with a message
    // that names the template.
    let templates = [
        "{% for i in range(100000) %}{% for j in range(100000) %}{% for k in range(100000) %}{% endfor %}{% endfor %}{% endfor %}",
        "{% for i in range(100000) %}{{ 'x' * 1000000 }}{% endfor %}",
        "{% set s = namespace(v='ab') %}{% for i in range(60) %}{% set s.v = s.v ~ s.v %}{% endfor %}{{ s.v }}",
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    ];
    for src in templates {
        let t = ChatTemplate::new(
            src,
            Default::default(),
            PathBuf::from("tokenizer_config.json"),
        )
        .unwrap();
        let t0 = std::time::Instant::now();
        let e = t.render(&msgs(), false).unwrap_err().to_string();
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "{src}: took {:?}",
            t0.elapsed()
        );
        assert!(
            e.contains("tokenizer_config.json") && e.contains("chat_template"),
            "{src}: {e}"
        );
    }
}

#[test]
fn generation_blocks_render_their_body() {
    // transformers' `{% generation %}` (for assistant masks) renders its body unchanged,
    // whitespace control included.
    let with = ChatTemplate::new(
        "{% for m in messages %}<{{ m.role }}>{%- generation -%}\n  {{ m.content }}  \n{%- endgeneration %}|{% endfor %}",
        Default::default(),
        PathBuf::from("chat_template.jinja"),
    )
    .unwrap();
    let without = ChatTemplate::new(
        "{% for m in messages %}<{{ m.role }}>{%- if true -%}\n  {{ m.content }}  \n{%- endif %}|{% endfor %}",
        Default::default(),
        PathBuf::from("chat_template.jinja"),
    )
    .unwrap();
    let m = vec![
        json!({"role": "user", "content": "hi"}),
        json!({"role": "assistant", "content": "yo"}),
    ];
    assert_eq!(with.render(&m, false).unwrap(), "<user>hi|<assistant>yo|");
    assert_eq!(
        with.render(&m, false).unwrap(),
        without.render(&m, false).unwrap()
    );
}
