//! The built-in demo's text: a small generated world of animals in English and French.
//!
//! Every sentence comes from the grammar below (no outside text, nothing to license). The base
//! model is pretrained on monolingual paragraphs, each headed `english :` or `french :`, so it
//! writes fluent sentences in either language but has never seen a sentence next to its
//! translation. The adaptation task is translation: prompt `english : <sentence> french :`,
//! completion the French sentence. French word order and agreement differ from English
//! (gender of articles and adjectives, most adjectives after the noun, `petit`/`grand`/`vieux`/
//! `jeune` before it), so the task cannot be done word by word.

use lora_kernels::rng::Rng;

/// (English, French, feminine)
const NOUNS: &[(&str, &str, bool)] = &[
    ("cat", "chat", false),
    ("dog", "chien", false),
    ("rabbit", "lapin", false),
    ("fox", "renard", false),
    ("wolf", "loup", false),
    ("horse", "cheval", false),
    ("fish", "poisson", false),
    ("sheep", "mouton", false),
    ("duck", "canard", false),
    ("snake", "serpent", false),
    ("mouse", "souris", true),
    ("cow", "vache", true),
    ("goat", "chèvre", true),
    ("hen", "poule", true),
    ("turtle", "tortue", true),
    ("frog", "grenouille", true),
    ("owl", "chouette", true),
];

/// (English, French third person singular)
const VERBS: &[(&str, &str)] = &[
    ("eats", "mange"),
    ("sees", "voit"),
    ("follows", "suit"),
    ("likes", "aime"),
    ("finds", "trouve"),
    ("catches", "attrape"),
    ("watches", "regarde"),
    ("chases", "chasse"),
    ("helps", "aide"),
    ("hears", "entend"),
];

/// (English, French masculine, French feminine, placed before the noun in French)
const ADJECTIVES: &[(&str, &str, &str, bool)] = &[
    ("small", "petit", "petite", true),
    ("big", "grand", "grande", true),
    ("old", "vieux", "vieille", true),
    ("young", "jeune", "jeune", true),
    ("red", "rouge", "rouge", false),
    ("black", "noir", "noire", false),
    ("white", "blanc", "blanche", false),
    ("green", "vert", "verte", false),
    ("happy", "heureux", "heureuse", false),
    ("lazy", "paresseux", "paresseuse", false),
    ("brave", "courageux", "courageuse", false),
];

/// (English, French)
const PLACES: &[(&str, &str)] = &[
    ("in the garden", "dans le jardin"),
    ("in the forest", "dans la forêt"),
    ("near the river", "près de la rivière"),
    ("on the hill", "sur la colline"),
    ("at night", "la nuit"),
    ("in the morning", "le matin"),
    ("under the bridge", "sous le pont"),
    ("in the snow", "dans la neige"),
];

/// The special token (id 0): beginning of every encoded text, and padding.
pub const SPECIAL: &str = "<|endoftext|>";
/// The unknown-word token (id 1).
pub const UNK: &str = "<unk>";

fn pick<'a, T>(rng: &mut Rng, xs: &'a [T]) -> &'a T {
    &xs[(rng.next_u64() % xs.len() as u64) as usize]
}

fn noun_phrase(rng: &mut Rng, definite: bool) -> (String, String) {
    let &(en_n, fr_n, fem) = pick(rng, NOUNS);
    let adj = (rng.uniform() < 0.5).then(|| *pick(rng, ADJECTIVES));
    let en_adj = adj.map(|a| a.0);
    let en_det = match (definite, en_adj.or(Some(en_n))) {
        (true, _) => "the",
        (false, Some(w)) if w.starts_with(['a', 'e', 'i', 'o', 'u']) => "an",
        (false, _) => "a",
    };
    let en = match en_adj {
        Some(a) => format!("{en_det} {a} {en_n}"),
        None => format!("{en_det} {en_n}"),
    };
    let fr_det = match (definite, fem) {
        (true, false) => "le",
        (true, true) => "la",
        (false, false) => "un",
        (false, true) => "une",
    };
    let fr = match adj {
        Some((_, m, f, before)) => {
            let a = if fem { f } else { m };
            if before {
                format!("{fr_det} {a} {fr_n}")
            } else {
                format!("{fr_det} {fr_n} {a}")
            }
        }
        None => format!("{fr_det} {fr_n}"),
    };
    (en, fr)
}

/// One sentence and its translation, both ending in ` .`.
pub fn sentence(rng: &mut Rng) -> (String, String) {
    let definite = rng.uniform() < 0.6;
    let (se, sf) = noun_phrase(rng, definite);
    let &(ve, vf) = pick(rng, VERBS);
    let definite = rng.uniform() < 0.5;
    let (oe, of) = noun_phrase(rng, definite);
    let place = (rng.uniform() < 0.5).then(|| *pick(rng, PLACES));
    match place {
        Some((pe, pf)) => (
            format!("{se} {ve} {oe} {pe} ."),
            format!("{sf} {vf} {of} {pf} ."),
        ),
        None => (format!("{se} {ve} {oe} ."), format!("{sf} {vf} {of} .")),
    }
}

/// Every word the grammar can produce, plus the prompt words, in a fixed order.
pub fn vocabulary() -> Vec<String> {
    let mut v: Vec<String> = vec![SPECIAL.into(), UNK.into()];
    let mut add = |s: &str| {
        for w in s.split(' ') {
            if !v.iter().any(|x| x == w) {
                v.push(w.to_string());
            }
        }
    };
    for w in [
        "english", "french", "glossary", ":", ".", "the", "a", "an", "le", "la", "un", "une",
    ] {
        add(w);
    }
    for (e, f, _) in NOUNS {
        add(e);
        add(f);
    }
    for (e, f) in VERBS {
        add(e);
        add(f);
    }
    for (e, m, f, _) in ADJECTIVES {
        add(e);
        add(m);
        add(f);
    }
    for (e, f) in PLACES {
        add(e);
        add(f);
    }
    v
}

/// A `tokenizer.json` (Hugging Face `tokenizers` format): one token per word or punctuation
/// mark (`WordLevel` after the `Whitespace` pre-tokenizer), `<|endoftext|>` prepended to every
/// encoded text by the post-processor, decoding joins tokens with spaces.
pub fn tokenizer_json() -> String {
    let vocab = vocabulary();
    let map: serde_json::Map<String, serde_json::Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, w)| (w.clone(), serde_json::json!(i)))
        .collect();
    let added = |id: usize, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let bos = serde_json::json!({"SpecialToken": {"id": SPECIAL, "type_id": 0}});
    let tok = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [added(0, SPECIAL), added(1, UNK)],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {SPECIAL: {"id": SPECIAL, "ids": [0], "tokens": [SPECIAL]}},
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": map, "unk_token": UNK},
    });
    serde_json::to_string_pretty(&tok).expect("serialises") + "\n"
}

/// A noun phrase of a story's cast: (noun index, adjective index).
type Character = (usize, Option<usize>);

fn mention(c: Character, first: bool, french: bool) -> String {
    let (en_n, fr_n, fem) = NOUNS[c.0];
    let adj = c.1.map(|i| ADJECTIVES[i]);
    if !french {
        let head = adj.map_or(en_n, |a| a.0);
        let det = match first {
            false => "the",
            true if head.starts_with(['a', 'e', 'i', 'o', 'u']) => "an",
            true => "a",
        };
        return match adj {
            Some(a) => format!("{det} {} {en_n}", a.0),
            None => format!("{det} {en_n}"),
        };
    }
    let det = match (first, fem) {
        (false, false) => "le",
        (false, true) => "la",
        (true, false) => "un",
        (true, true) => "une",
    };
    match adj {
        Some((_, m, f, before)) => {
            let a = if fem { f } else { m };
            if before {
                format!("{det} {a} {fr_n}")
            } else {
                format!("{det} {fr_n} {a}")
            }
        }
        None => format!("{det} {fr_n}"),
    }
}

/// A short story in one language: a cast of two or three animals, introduced with an indefinite
/// article and referred to with a definite one afterwards, doing things to each other.
fn story(rng: &mut Rng, french: bool) -> String {
    let k = 2 + (rng.next_u64() % 2) as usize;
    let mut cast: Vec<Character> = Vec::with_capacity(k);
    while cast.len() < k {
        let n = (rng.next_u64() % NOUNS.len() as u64) as usize;
        let a = (rng.uniform() < 0.6).then(|| (rng.next_u64() % ADJECTIVES.len() as u64) as usize);
        if !cast.iter().any(|c| c.0 == n) {
            cast.push((n, a));
        }
    }
    let mut introduced = vec![false; k];
    let n = 3 + (rng.next_u64() % 4) as usize;
    let mut out = String::from(if french { "french :" } else { "english :" });
    for _ in 0..n {
        let s = (rng.next_u64() % k as u64) as usize;
        let o = (s + 1 + (rng.next_u64() % (k as u64 - 1)) as usize) % k;
        let &(ve, vf) = pick(rng, VERBS);
        let place = (rng.uniform() < 0.3).then(|| *pick(rng, PLACES));
        let subj = mention(cast[s], !introduced[s], french);
        introduced[s] = true;
        let obj = mention(cast[o], !introduced[o], french);
        introduced[o] = true;
        out.push(' ');
        out.push_str(&subj);
        out.push(' ');
        out.push_str(if french { vf } else { ve });
        out.push(' ');
        out.push_str(&obj);
        if let Some((pe, pf)) = place {
            out.push(' ');
            out.push_str(if french { pf } else { pe });
        }
        out.push_str(" .");
    }
    out
}

/// A glossary paragraph: a few English words each followed by its French forms
/// (`glossary : fox renard . green vert verte .`). Word pairs only, never a sentence.
fn glossary(rng: &mut Rng) -> String {
    let mut out = String::from("glossary :");
    for _ in 0..6 {
        let entry = match rng.next_u64() % 3 {
            0 => {
                let (e, f, _) = *pick(rng, NOUNS);
                format!("{e} {f}")
            }
            1 => {
                let (e, f) = *pick(rng, VERBS);
                format!("{e} {f}")
            }
            _ => {
                let (e, m, f, _) = *pick(rng, ADJECTIVES);
                if m == f {
                    format!("{e} {m}")
                } else {
                    format!("{e} {m} {f}")
                }
            }
        };
        out.push(' ');
        out.push_str(&entry);
        out.push_str(" .");
    }
    out
}

/// The pretraining corpus: `paragraphs` paragraphs separated by blank lines: short stories in
/// English or French (never a story next to its translation) and, one in ten, a glossary of
/// word pairs, the way a real corpus holds dictionaries but few aligned sentences.
pub fn pretrain_corpus(paragraphs: usize, seed: u64) -> String {
    let mut rng = Rng::new(seed);
    let mut out = String::new();
    for _ in 0..paragraphs {
        let p = if rng.uniform() < 0.1 {
            glossary(&mut rng)
        } else {
            let french = rng.uniform() < 0.5;
            story(&mut rng, french)
        };
        out.push_str(&p);
        out.push_str("\n\n");
    }
    out
}

/// The translation task as prompt/completion JSONL: `(train, eval)` with `train` and `eval`
/// pairs, no English sentence in both.
pub fn translation_sets(train: usize, eval: usize, seed: u64) -> (String, String) {
    let mut rng = Rng::new(seed);
    let mut seen = std::collections::HashSet::new();
    let mut lines = Vec::with_capacity(train + eval);
    while lines.len() < train + eval {
        let (e, f) = sentence(&mut rng);
        if !seen.insert(e.clone()) {
            continue;
        }
        let obj = serde_json::json!({"prompt": format!("english : {e} french :"), "completion": format!(" {f}")});
        lines.push(obj.to_string());
    }
    let join = |ls: &[String]| ls.iter().map(|l| format!("{l}\n")).collect::<String>();
    (join(&lines[eval..]), join(&lines[..eval]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn french_agrees_and_orders_adjectives() {
        let mut rng = Rng::new(3);
        let mut seen_after = false;
        for _ in 0..500 {
            let (e, f) = sentence(&mut rng);
            assert!(e.ends_with(" .") && f.ends_with(" ."), "{e} | {f}");
            for w in f.split(' ') {
                assert!(vocabulary().iter().any(|v| v == w), "{w} not in vocabulary");
            }
            if f.contains("la souris noire") {
                seen_after = true;
            }
            let words: Vec<&str> = f.split(' ').collect();
            for pair in words.windows(2) {
                assert!(
                    !matches!(
                        pair,
                        ["le" | "un", "souris" | "vache"] | ["la" | "une", "chat" | "chien"]
                    ),
                    "article disagrees with the noun: {f}"
                );
            }
            assert!(!e.contains("a old") && !e.contains("an cat"));
        }
        assert!(seen_after);
    }

    #[test]
    fn sets_are_disjoint_and_reproducible() {
        let (t, e) = translation_sets(300, 50, 9);
        assert_eq!((t.lines().count(), e.lines().count()), (300, 50));
        let prompts = |s: &str| -> std::collections::HashSet<String> {
            s.lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["prompt"].to_string()
                })
                .collect()
        };
        assert!(prompts(&t).is_disjoint(&prompts(&e)));
        assert_eq!(translation_sets(300, 50, 9), (t, e));
    }
}
