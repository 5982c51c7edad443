//! The diffusion demo's generated data: captioned images of one coloured shape on a light
//! background, in the base model's look (the shape filled) and in the new style the LoRA learns
//! (its outline); and the CLIP tokenizer files (byte-level BPE
//! whose merges make each caption word one token).

use lora_io::images::Rgb8;
use lora_kernels::rng::{splitmix64, Rng};
use serde_json::{json, Value};
use std::collections::HashMap;

/// The colour words and their RGB values.
pub const COLOURS: [(&str, [f64; 3]); 6] = [
    ("red", [215.0, 40.0, 40.0]),
    ("green", [40.0, 165.0, 60.0]),
    ("blue", [40.0, 80.0, 220.0]),
    ("yellow", [235.0, 200.0, 35.0]),
    ("purple", [140.0, 60.0, 190.0]),
    ("orange", [240.0, 130.0, 30.0]),
];

/// The shape words.
pub const SHAPES: [&str; 3] = ["circle", "square", "triangle"];

/// Colour/shape pairs the style LoRA never sees (the demo checks that the style reaches them).
pub const HELD_OUT: [(usize, usize); 3] = [(5, 2), (4, 1), (1, 0)];

/// The words the tokenizer makes single tokens of.
pub fn words() -> Vec<&'static str> {
    let mut w = vec!["a", "an"];
    w.extend(COLOURS.iter().map(|c| c.0));
    w.extend(SHAPES);
    w
}

/// The caption of colour `c`, shape `s`.
pub fn caption(c: usize, s: usize) -> String {
    let colour = COLOURS[c].0;
    let article = if colour.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {colour} {}", SHAPES[s])
}

/// How an image is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Look {
    /// The base model's: the shape filled.
    Base,
    /// The new style: the shape's outline (a twelfth of the image wide).
    Outline,
}

/// The demo's background.
pub const LIGHT: [f64; 3] = [244.0, 241.0, 232.0];
/// A dark background the autoencoder also learns (see [`vae_example`]).
pub const DARK: [f64; 3] = [22.0, 28.0, 58.0];

/// Whether `(x, y)` is inside shape `s` centred at `(cx, cy)` with radius `r`.
fn inside(s: usize, (cx, cy, r): (f64, f64, f64), x: f64, y: f64) -> bool {
    let (dx, dy) = (x - cx, y - cy);
    match s {
        0 => dx * dx + dy * dy <= r * r,
        1 => {
            let h = r * 0.86;
            dx.abs() <= h && dy.abs() <= h
        }
        _ => {
            // Upward equilateral triangle with circumradius r.
            let (top, base) = (-r, r * 0.5);
            if dy < top || dy > base {
                return false;
            }
            let half = (dy - top) / 1.5 * (3f64.sqrt() / 2.0);
            dx.abs() <= half
        }
    }
}

/// Image `index` of `size x size` pixels with colour `c` and shape `s` in `look`; position and
/// size drawn from `(seed, index)`.
pub fn draw(seed: u64, index: u64, size: usize, (c, s): (usize, usize), look: Look) -> Rgb8 {
    paint(seed, index, size, s, look, (LIGHT, COLOURS[c].1))
}

/// Shape `s` in `look` with background and foreground colours `(bg, fg)`.
fn paint(
    seed: u64,
    index: u64,
    size: usize,
    s: usize,
    look: Look,
    (bg, fg): ([f64; 3], [f64; 3]),
) -> Rgb8 {
    let mut rng = Rng::new(splitmix64(seed ^ splitmix64(index.wrapping_add(0x5eed))));
    let n = size as f64;
    let r = n * (0.24 + 0.12 * rng.uniform());
    let jitter = n * 0.1;
    let cx = n / 2.0 + jitter * (2.0 * rng.uniform() - 1.0);
    let cy = n / 2.0 + jitter * (2.0 * rng.uniform() - 1.0);
    // The outline's inner shape: the radius less what makes the border `n / 12` wide (a
    // triangle's inradius is half its circumradius, a square's half side 0.86 of it).
    let width = n / 12.0;
    let inner = r - width * [1.0, 1.0 / 0.86, 2.0][s.min(2)];
    let mut data = Vec::with_capacity(size * size * 3);
    for y in 0..size {
        for x in 0..size {
            let a = crate::demo_detect_data::coverage(x, y, |fx, fy| {
                let outer = inside(s, (cx, cy, r), fx, fy);
                match look {
                    Look::Base => outer,
                    Look::Outline => outer && !inside(s, (cx, cy, inner), fx, fy),
                }
            });
            for k in 0..3 {
                let v = bg[k] * (1.0 - a) + fg[k] * a;
                data.push(v.round().clamp(0.0, 255.0) as u8);
            }
        }
    }
    Rgb8::new(size, size, data).expect("size * size * 3 bytes")
}

/// The autoencoder's training image `index`: any shape, filled or outlined, in the palette's
/// colours on the light or the dark background (three images in four) or in any colours on any
/// background, so that it encodes and decodes the style set as well as the base's images (a
/// general-purpose autoencoder, as Stable Diffusion's is).
pub fn vae_example(seed: u64, index: u64, size: usize) -> Rgb8 {
    let mut rng = Rng::new(splitmix64(seed ^ index ^ 0x7ae));
    let (bg, fg) = if rng.uniform() < 0.75 {
        let bg = if rng.uniform() < 0.5 { LIGHT } else { DARK };
        (
            bg,
            COLOURS[(rng.next_u64() % COLOURS.len() as u64) as usize].1,
        )
    } else {
        let mut colour = || [0; 3].map(|_: i32| (rng.next_u64() % 256) as f64);
        (colour(), colour())
    };
    let mut rng = Rng::new(splitmix64(seed ^ index ^ 0x5a3e));
    let s = (rng.next_u64() % SHAPES.len() as u64) as usize;
    let look = if rng.uniform() < 0.5 {
        Look::Base
    } else {
        Look::Outline
    };
    paint(seed, index, size, s, look, (bg, fg))
}

/// The base model's training example `index`: any colour and shape, the base look.
pub fn base_example(seed: u64, index: u64, size: usize) -> (Rgb8, String) {
    let mut rng = Rng::new(splitmix64(seed ^ index));
    let c = (rng.next_u64() % COLOURS.len() as u64) as usize;
    let s = (rng.next_u64() % SHAPES.len() as u64) as usize;
    (draw(seed, index, size, (c, s), Look::Base), caption(c, s))
}

/// The style set's example `index`: colours and shapes other than [`HELD_OUT`], in the
/// outline style, captioned as the base's.
pub fn style_example(seed: u64, index: u64, size: usize) -> (Rgb8, String, (usize, usize)) {
    let pairs: Vec<(usize, usize)> = (0..COLOURS.len())
        .flat_map(|c| (0..SHAPES.len()).map(move |s| (c, s)))
        .filter(|p| !HELD_OUT.contains(p))
        .collect();
    let p = pairs[(index % pairs.len() as u64) as usize];
    (
        draw(seed, index, size, p, Look::Outline),
        caption(p.0, p.1),
        p,
    )
}

/// GPT-2's byte-to-character table (CLIP's byte-level alphabet).
fn bytes_to_unicode() -> Vec<char> {
    let keep =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0;
    (0..256u32)
        .map(|b| {
            if keep(b) {
                char::from_u32(b).expect("latin-1")
            } else {
                extra += 1;
                char::from_u32(255 + extra).expect("valid")
            }
        })
        .collect()
}

/// BPE of one word (its symbols, the last with `</w>`) under `merges` (rank order).
fn bpe(word: &str, ranks: &HashMap<(String, String), usize>) -> Vec<String> {
    let chars: Vec<char> = word.chars().collect();
    let mut sym: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
    if let Some(last) = sym.last_mut() {
        last.push_str("</w>");
    }
    loop {
        let best = (0..sym.len().saturating_sub(1))
            .filter_map(|i| {
                ranks
                    .get(&(sym[i].clone(), sym[i + 1].clone()))
                    .map(|&r| (r, i))
            })
            .min();
        let Some((_, i)) = best else { break };
        let joined = format!("{}{}", sym[i], sym[i + 1]);
        sym.splice(i..i + 2, [joined]);
    }
    sym
}

/// CLIP tokenizer files for `words`: `(vocab.json, merges.txt)`. The vocabulary is CLIP's
/// layout in small: the 256 byte-level symbols, the same with `</w>`, the merges' results,
/// then `<|startoftext|>` and `<|endoftext|>`. Merges are appended word by word, each joining
/// what the earlier ones leave of the word left to right, so every word is one token (earlier
/// words keep theirs: a later merge ranks after all of their own).
pub fn tokenizer_files(words: &[&str]) -> (String, String) {
    let alphabet = bytes_to_unicode();
    let mut vocab: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
    vocab.extend(alphabet.iter().map(|c| format!("{c}</w>")));
    let mut merges: Vec<(String, String)> = Vec::new();
    let mut ranks: HashMap<(String, String), usize> = HashMap::new();
    for w in words {
        let mut toks = bpe(w, &ranks);
        while toks.len() > 1 {
            let pair = (toks[0].clone(), toks[1].clone());
            let joined = format!("{}{}", pair.0, pair.1);
            ranks.insert(pair.clone(), merges.len());
            merges.push(pair);
            vocab.push(joined.clone());
            toks.splice(0..2, [joined]);
        }
    }
    vocab.push("<|startoftext|>".into());
    vocab.push("<|endoftext|>".into());
    let map: serde_json::Map<String, Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), Value::from(i)))
        .collect();
    let mut m = String::from("#version: 0.2\n");
    for (a, b) in &merges {
        m.push_str(&format!("{a} {b}\n"));
    }
    (
        serde_json::to_string(&Value::Object(map)).expect("serialises"),
        m,
    )
}

/// `tokenizer_config.json` for a prompt length of `max_len` tokens.
pub fn tokenizer_config(max_len: usize) -> Value {
    json!({
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": max_len,
        "do_lower_case": true,
        "errors": "replace",
        "add_prefix_space": false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_deterministic_and_the_styles_differ_where_expected() {
        let a = draw(1, 5, 32, (0, 0), Look::Base);
        assert_eq!(a, draw(1, 5, 32, (0, 0), Look::Base));
        assert_ne!(a, draw(1, 6, 32, (0, 0), Look::Base));
        let b = draw(1, 5, 32, (0, 0), Look::Outline);
        // Corners: the background.
        assert_eq!(&a.data[..3], &[244, 241, 232]);
        assert_eq!(&b.data[..3], &[244, 241, 232]);
        // The base's centre is the colour; the outline's centre is background.
        let centre = (16 * 32 + 16) * 3;
        assert_eq!(&a.data[centre..centre + 3], &[215, 40, 40]);
        assert_eq!(&b.data[centre..centre + 3], &[244, 241, 232]);
        // The outline has some of the colour.
        assert!(b.data.chunks(3).filter(|p| p == &[215, 40, 40]).count() > 30);
    }

    #[test]
    fn the_style_set_leaves_out_the_held_out_pairs_and_covers_the_rest() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..100 {
            let (_, cap, p) = style_example(3, i, 32);
            assert!(!HELD_OUT.contains(&p));
            assert_eq!(cap, caption(p.0, p.1));
            seen.insert(p);
        }
        assert_eq!(seen.len(), COLOURS.len() * SHAPES.len() - HELD_OUT.len());
    }

    #[test]
    fn every_word_is_one_token() {
        let dir = std::env::temp_dir().join(format!("lora-demo-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (v, m) = tokenizer_files(&words());
        std::fs::write(dir.join("vocab.json"), v).unwrap();
        std::fs::write(dir.join("merges.txt"), m).unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            tokenizer_config(16).to_string(),
        )
        .unwrap();
        let tok = lora_io::clip_tokenizer::ClipTokenizer::from_dir(&dir).unwrap();
        let vocab: HashMap<String, u64> =
            serde_json::from_slice(&std::fs::read(dir.join("vocab.json")).unwrap()).unwrap();
        let (bos, eos) = (
            vocab["<|startoftext|>"] as u32,
            vocab["<|endoftext|>"] as u32,
        );
        for w in words() {
            let ids = tok.encode_prompt(w).unwrap();
            assert_eq!(ids.len(), 16);
            assert_eq!(ids[0], bos);
            assert_eq!(ids[1] as u64, vocab[&format!("{w}</w>")], "{w}");
            assert!(ids[2..].iter().all(|&t| t == eos), "{w}: {ids:?}");
        }
        // Any other text still tokenizes (byte-level symbols), upper case folded.
        let ids = tok.encode_prompt("A Red cat, 42!").unwrap();
        assert_eq!(ids[1] as u64, vocab["a</w>"]);
        assert_eq!(ids[2] as u64, vocab["red</w>"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
