//! Chat templates: the Jinja template a Hugging Face tokenizer ships (`chat_template.jinja`, or
//! `chat_template` in `tokenizer_config.json`) rendered as transformers' `apply_chat_template`
//! renders it: blocks trimmed and left-stripped, loop controls, Python string methods
//! (`.strip()`, `.startswith()`, ... through `minijinja-contrib`'s pycompat), `raise_exception`,
//! `strftime_now`, a `tojson` that writes what Python's `json.dumps(ensure_ascii=False)` writes,
//! `tools`/`documents` = None, and the tokenizer's special tokens (`bos_token`, `eos_token`, ...)
//! as variables.
//!
//! The rendered text is then tokenized without adding special tokens (the template writes them),
//! as transformers does.

use crate::error::{IoError, Result};
use crate::hf::read_json;
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// Special-token names transformers passes to the template.
const SPECIAL: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    origin: PathBuf,
    special: BTreeMap<String, String>,
    /// The time `strftime_now` reports, seconds since the Unix epoch (UTC).
    now: Arc<AtomicI64>,
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Python's `time.strftime(fmt)` for the UTC time `secs`, for the codes chat templates use
/// (`%d %b %Y` and friends); another code is an error naming it.
pub fn strftime(fmt: &str, secs: i64) -> std::result::Result<String, String> {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let d = doy_mar - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(m - 1) as usize] + d + i64::from(leap && m > 2);
    let wday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let (h, mi, sec) = (sod / 3600, sod / 60 % 60, sod % 60);
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut it = fmt.chars();
    while let Some(c) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let code = it.next().ok_or("a format ending in `%`")?;
        out += &match code {
            'Y' => y.to_string(),
            'y' => format!("{:02}", y.rem_euclid(100)),
            'm' => format!("{m:02}"),
            'd' => format!("{d:02}"),
            'e' => format!("{d:2}"),
            'b' | 'h' => month[..3].to_string(),
            'B' => month.to_string(),
            'a' => DAYS[wday][..3].to_string(),
            'A' => DAYS[wday].to_string(),
            'j' => format!("{yday:03}"),
            'H' => format!("{h:02}"),
            'I' => format!("{:02}", (h + 11) % 12 + 1),
            'p' => (if h < 12 { "AM" } else { "PM" }).to_string(),
            'M' => format!("{mi:02}"),
            'S' => format!("{sec:02}"),
            '%' => "%".to_string(),
            other => return Err(format!("unsupported format code `%{other}`")),
        };
    }
    Ok(out)
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("special", &self.special)
            .finish()
    }
}

fn cfg_err(path: &Path, field: &str, reason: impl Into<String>) -> IoError {
    IoError::Config {
        path: path.into(),
        field: field.into(),
        reason: reason.into(),
    }
}

/// A token as `tokenizer_config.json` writes it: a string or `{"content": ...}`.
fn token_string(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

/// The arguments of Python's `json.dumps` that transformers' `tojson` passes on.
struct PyJson {
    indent: Option<usize>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl PyJson {
    /// A JSON string literal: escaped as JSON requires (no `\/`, no HTML escaping), and with
    /// `ensure_ascii` every non-ASCII character as `\uXXXX` (UTF-16, lowercase, as Python).
    fn string(&self, s: &str, out: &mut String) {
        let lit = Json::String(s.to_string()).to_string();
        if !self.ensure_ascii {
            out.push_str(&lit);
            return;
        }
        for c in lit.chars() {
            if c.is_ascii() {
                out.push(c);
            } else {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
        }
    }

    /// `json.dumps(v, ...)`: with an indent, the item separator is followed by a new line.
    fn write(&self, v: &Json, depth: usize, out: &mut String) {
        let newline = |out: &mut String, d: usize| {
            if let Some(n) = self.indent {
                out.push('\n');
                out.push_str(&" ".repeat(n * d));
            }
        };
        match v {
            Json::Array(a) if !a.is_empty() => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    newline(out, depth + 1);
                    self.write(x, depth + 1, out);
                }
                newline(out, depth);
                out.push(']');
            }
            Json::Object(o) if !o.is_empty() => {
                let mut items: Vec<(&String, &Json)> = o.iter().collect();
                if self.sort_keys {
                    items.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (k, x)) in items.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    newline(out, depth + 1);
                    self.string(k, out);
                    out.push_str(&self.key_sep);
                    self.write(x, depth + 1, out);
                }
                newline(out, depth);
                out.push('}');
            }
            Json::String(s) => self.string(s, out),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Null => out.push_str("null"),
            other => out.push_str(&other.to_string()),
        }
    }
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`,
/// which is Python's `json.dumps` with those arguments.
fn tojson(v: Value, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let (item_sep, key_sep) = match separators {
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(s) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: separators must be two strings, got {}", s.len()),
            ))
        }
    };
    let opts = PyJson {
        indent,
        item_sep,
        key_sep,
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    let j = serde_json::to_value(&v).map_err(|e| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: cannot encode: {e}"),
        )
    })?;
    let mut s = String::new();
    opts.write(&j, 0, &mut s);
    Ok(Value::from_safe_string(s))
}

/// transformers' `{% generation %}...{% endgeneration %}` marks the assistant's text for its
/// assistant masks and renders its body unchanged: here it becomes `{% if true %}...{% endif %}`,
/// keeping the tags' whitespace control, so templates that carry it render the same text.
fn generation_as_plain_blocks(source: &str) -> String {
    let open = regex::Regex::new(r"(\{%[-+]?\s*)generation(\s*[-+]?%\})").expect("valid regex");
    let close = regex::Regex::new(r"(\{%[-+]?\s*)endgeneration(\s*[-+]?%\})").expect("valid regex");
    let s = close.replace_all(source, "${1}endif${2}");
    open.replace_all(&s, "${1}if true${2}").into_owned()
}

/// The work one rendering may do (minijinja fuel: about one unit per instruction and per 64
/// bytes the template creates), so a template that loops without end or builds gigabytes stops
/// with an error. Real chat templates use a few thousand units per conversation.
pub const RENDER_FUEL: u64 = 5_000_000;

impl ChatTemplate {
    /// Compiles `source` (a Jinja template); `special` maps names such as `eos_token` to their
    /// strings; `origin` names the file in errors.
    pub fn new(source: &str, special: BTreeMap<String, String>, origin: PathBuf) -> Result<Self> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("default delimiters"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // A template is code from the model's files: bound the work and memory of one render.
        env.set_fuel(Some(RENDER_FUEL));
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_filter("tojson", tojson);
        // transformers defines `strftime_now(fmt)` as the current local time; here UTC, and
        // `SOURCE_DATE_EPOCH` (seconds) pins it. A training run records the time it used and a
        // resumed run renders with it again (`set_now`).
        let now = Arc::new(AtomicI64::new(
            std::env::var("SOURCE_DATE_EPOCH")
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| {
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs() as i64)
                        .unwrap_or(0)
                }),
        ));
        let clock = now.clone();
        env.add_function(
            "strftime_now",
            move |fmt: String| -> std::result::Result<Value, Error> {
                strftime(&fmt, clock.load(Ordering::Relaxed))
                    .map(Value::from)
                    .map_err(|e| {
                        Error::new(ErrorKind::InvalidOperation, format!("strftime_now: {e}"))
                    })
            },
        );
        env.add_template_owned("chat", generation_as_plain_blocks(source))
            .map_err(|e| cfg_err(&origin, "chat_template", format!("does not compile: {e:#}")))?;
        Ok(Self {
            env,
            origin,
            special,
            now,
        })
    }

    /// The template of a model directory: `chat_template.jinja` if present, else
    /// `tokenizer_config.json`'s `chat_template` (a string, or a list of `{name, template}` of
    /// which `default` is used). `None` when the directory has neither.
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let dir = dir.as_ref();
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = if cfg_path.exists() {
            read_json(&cfg_path)?
        } else {
            Json::Null
        };
        let special: BTreeMap<String, String> = SPECIAL
            .iter()
            .filter_map(|k| Some((k.to_string(), token_string(cfg.get(*k)?)?)))
            .collect();
        let file = dir.join("chat_template.jinja");
        if file.exists() {
            let bytes = crate::files::read_small(&file, "chat template")?.unwrap_or_default();
            let src = String::from_utf8(bytes)
                .map_err(|e| cfg_err(&file, "(file)", format!("not valid UTF-8: {e}")))?;
            return Self::new(&src, special, file).map(Some);
        }
        let src = match cfg.get("chat_template") {
            None | Some(Json::Null) => return Ok(None),
            Some(Json::String(s)) => s.clone(),
            Some(Json::Array(list)) => {
                let named = |n: &str| {
                    list.iter()
                        .find(|t| t.get("name").and_then(Json::as_str) == Some(n))
                        .and_then(|t| t.get("template")?.as_str().map(String::from))
                };
                named("default").ok_or_else(|| {
                    cfg_err(
                        &cfg_path,
                        "chat_template",
                        "a list of named templates without one named `default`",
                    )
                })?
            }
            Some(other) => {
                return Err(cfg_err(
                    &cfg_path,
                    "chat_template",
                    format!("expected a string or a list, got {other}"),
                ))
            }
        };
        Self::new(&src, special, cfg_path).map(Some)
    }

    /// The time `strftime_now` reports (seconds since the Unix epoch, UTC).
    pub fn now(&self) -> i64 {
        self.now.load(Ordering::Relaxed)
    }

    /// Sets the time `strftime_now` reports.
    pub fn set_now(&self, secs: i64) {
        self.now.store(secs, Ordering::Relaxed);
    }

    /// Where the template came from.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// Renders `messages` (objects with at least `role`; every field is visible to the
    /// template), ending with the assistant's opening when `add_generation_prompt`.
    pub fn render(&self, messages: &[Json], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// [`render`](Self::render) with tool definitions (`tools`, a list of JSON schemas, as
    /// transformers' `apply_chat_template(tools=...)` receives them).
    pub fn render_with_tools(
        &self,
        messages: &[Json],
        tools: Option<&Json>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let t = self.env.get_template("chat").expect("added in new");
        let mut ctx: BTreeMap<String, Value> = self
            .special
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        ctx.insert(
            "messages".into(),
            Value::from(minijinja::value::Serde(messages)),
        );
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        // transformers passes these as None when absent: `tools is not none` must be false.
        ctx.insert(
            "tools".into(),
            tools.map_or(Value::from(()), |t| Value::from(minijinja::value::Serde(t))),
        );
        ctx.insert("documents".into(), Value::from(()));
        t.render(ctx).map_err(|e| {
            if e.kind() == ErrorKind::OutOfFuel {
                return cfg_err(
                    &self.origin,
                    "chat_template",
                    format!(
                        "rendering stopped: the template did more than {RENDER_FUEL} units of work \
                         for one conversation (a loop without end, or output of hundreds of \
                         megabytes)"
                    ),
                );
            }
            let defined: Vec<&str> = self.special.keys().map(String::as_str).collect();
            cfg_err(
                &self.origin,
                "chat_template",
                format!(
                    "rendering failed: {} (special tokens given to the template, from \
                     tokenizer_config.json: {})",
                    e.detail().unwrap_or(&e.to_string()),
                    if defined.is_empty() {
                        "none".to_string()
                    } else {
                        defined.join(", ")
                    }
                ),
            )
        })
    }
}
