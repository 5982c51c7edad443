//! `--model org/name` for a model that is not in the local Hugging Face cache yet: the files a
//! model directory needs are downloaded with the `hf-hub` crate into that same cache
//! (`models--org--name/snapshots/<commit>/`, `refs/<revision>`, as `huggingface_hub` lays it
//! out), then the id resolves like any cached one. `HF_HUB_OFFLINE=1` never downloads;
//! `HF_ENDPOINT` and `HF_TOKEN` are honoured.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// The files besides the weights that a model directory may hold (absent ones are skipped).
const OPTIONAL: [&str; 4] = [
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
];

/// `--model`: a directory, a cached Hub id, or (online) a Hub id downloaded now.
pub fn model_dir(model: &Path, revision: Option<&str>) -> Result<PathBuf> {
    let cached = match lora_io::hf::resolve_model_dir(model, revision) {
        Ok(p) => return Ok(p),
        Err(e) => e,
    };
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0");
    let id = model.to_string_lossy().to_string();
    if offline || model.exists() || !lora_io::hf::is_hub_id(&id) {
        return Err(cached.into());
    }
    match download(&id, revision.unwrap_or("main")) {
        Ok(()) => Ok(lora_io::hf::resolve_model_dir(model, revision)?),
        Err(e) => Err(anyhow::anyhow!(
            "{cached}; downloading it failed too: {e:#} (offline? set HF_HUB_OFFLINE=1 to skip \
             the attempt)"
        )),
    }
}

fn download(id: &str, revision: &str) -> Result<()> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Cache, Repo, RepoType};
    use std::io::IsTerminal;
    let mut api = ApiBuilder::from_cache(Cache::new(lora_io::hf::hub_cache_dir()))
        .with_progress(std::io::stderr().is_terminal());
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        api = api.with_endpoint(endpoint.trim_end_matches('/').to_string());
    }
    if let Ok(token) = std::env::var("HF_TOKEN") {
        api = api.with_token(Some(token));
    }
    let api = api.build().context("starting the Hub client")?;
    let repo = api.repo(Repo::with_revision(
        id.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    eprintln!("downloading {id} ({revision}) into the Hugging Face cache");
    let get = |f: &str| repo.get(f).with_context(|| format!("{id}: {f}"));
    get("config.json")?;
    get("tokenizer.json")?;
    for f in OPTIONAL {
        // Absent from many repositories: a failure here is not an error.
        let _ = repo.get(f);
    }
    if repo.get("model.safetensors").is_err() {
        let index = get("model.safetensors.index.json").context(
            "neither model.safetensors nor a shard index (pickle .bin files are not read)",
        )?;
        let v = lora_io::hf::read_json(&index)?;
        let mut shards: Vec<&str> = v["weight_map"]
            .as_object()
            .map(|m| m.values().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        shards.sort_unstable();
        shards.dedup();
        for s in shards {
            if s.contains('/') || s.contains("..") {
                anyhow::bail!("{}: shard name `{s}` is not a file name", index.display());
            }
            get(s)?;
        }
    }
    Ok(())
}
