//! The documentation names the tests that check its formulas and claims
//! (`file.rs::test_name`); this test fails when a named test no longer exists, so the docs
//! cannot point at tests that were renamed or removed. It also checks that every relative
//! link between the markdown files resolves.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        if p.is_dir() && name != "target" && !name.starts_with('.') {
            rust_files(&p, out);
        } else if name.ends_with(".rs") {
            out.push(p);
        }
    }
}

/// `(path suffix, function)` for every `something.rs::name` in `text`.
fn references(text: &str) -> Vec<(String, String)> {
    let mut refs = Vec::new();
    for (i, _) in text.match_indices(".rs::") {
        let start = text[..i]
            .rfind(|c: char| !(c.is_alphanumeric() || "_/-.".contains(c)))
            .map_or(0, |k| k + 1);
        let after = &text[i + 5..];
        let end = after
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        refs.push((text[start..i + 3].to_string(), after[..end].to_string()));
    }
    refs
}

#[test]
fn tests_named_in_the_docs_exist() {
    let root = lora_examples::repo_root();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.push(root.join("README.md"));
    let mut checked = 0;
    for doc in &docs {
        let text = std::fs::read_to_string(doc).unwrap();
        for (suffix, name) in references(&text) {
            let found = files.iter().any(|f| {
                f.to_string_lossy().ends_with(&suffix)
                    && std::fs::read_to_string(f)
                        .unwrap()
                        .contains(&format!("fn {name}("))
            });
            assert!(
                found,
                "{} names {suffix}::{name}, which does not exist",
                doc.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 5, "only {checked} references found");
}

#[test]
fn relative_links_between_docs_resolve() {
    let root = lora_examples::repo_root();
    for doc in [
        "README.md",
        "docs/guide.md",
        "docs/architecture.md",
        "demo/README.md",
    ] {
        let path = root.join(doc);
        let text = std::fs::read_to_string(&path).unwrap();
        for (i, _) in text.match_indices("](") {
            let rest = &text[i + 2..];
            let target = &rest[..rest.find(')').unwrap()];
            if target.starts_with("http") || target.starts_with('#') {
                continue;
            }
            let file = target.split('#').next().unwrap();
            assert!(
                path.parent().unwrap().join(file).exists(),
                "{doc} links to {target}, which does not exist"
            );
        }
    }
}
