//! `hf:` model paths: models fetched from a Hugging Face hub into a local
//! cache, then loaded like any local path.
//!
//! `hf:org/name` (or `hf:org/name@revision`) is an HF model directory:
//! `config.json`, `tokenizer.json`, `tokenizer_config.json` when the
//! repository has one, and the weights (`model.safetensors`, or
//! `model.safetensors.index.json` and the shards it names).
//! `hf:org/name/file.gguf` (optionally `@revision` at the end) is one GGUF
//! file. Files come from the hub's plain file URLs,
//! `{endpoint}/{org}/{name}/resolve/{revision}/{file}`, with `HF_TOKEN` as a
//! bearer token when it is set; the endpoint is `$HF_ENDPOINT`, else
//! <https://huggingface.co>. They land in
//! `{cache}/models--{org}--{name}/{revision}/` (the cache being
//! `$UNDERSTUDY_CACHE/hub`, else `~/.cache/understudy/hub`), each written to a
//! temporary file and renamed, so an interrupted download leaves no partial
//! file behind. A file already in the cache is not fetched again, and a
//! folder downloaded in full (marked `.complete`) is used without asking the
//! hub at all (a revision such as `main` is therefore read once); with
//! `HF_HUB_OFFLINE` set, only the cache is used.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Written into a repository's cache folder once every file is in: the
/// hub is not asked again (not even for the optional files it lacked).
const COMPLETE_MARKER: &str = ".complete";

/// The hub asked when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Where and how to fetch hub models.
#[derive(Clone)]
pub struct HubOptions {
    /// The hub's base URL, without a trailing slash.
    pub endpoint: String,
    /// Sent as `Authorization: Bearer ...`.
    pub token: Option<String>,
    /// The folder downloaded models are kept in; `None` when none is known.
    pub cache_dir: Option<PathBuf>,
    /// Use only what the cache holds.
    pub offline: bool,
}

impl std::fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubOptions")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("cache_dir", &self.cache_dir)
            .field("offline", &self.offline)
            .finish()
    }
}

impl HubOptions {
    /// `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE` and the Understudy cache folder.
    pub fn from_env() -> HubOptions {
        let var = |key: &str| std::env::var(key).ok().filter(|value| !value.trim().is_empty());
        HubOptions {
            endpoint: var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
            token: var("HF_TOKEN"),
            cache_dir: crate::hf::cache_root().map(|root| root.join("hub")),
            offline: var("HF_HUB_OFFLINE").is_some_and(|value| !matches!(value.trim(), "0" | "false" | "FALSE")),
        }
    }
}

/// A model named by an `hf:` path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubModel {
    /// `org/name`.
    pub repo: String,
    pub revision: String,
    /// A GGUF file inside the repository, or `None` for the HF directory.
    pub file: Option<String>,
}

impl HubModel {
    /// Reads what follows `hf:`: `org/name`, `org/name@revision`,
    /// `org/name/path/file.gguf`, `org/name/file.gguf@revision`.
    pub fn parse(text: &str) -> Result<HubModel, HubError> {
        let bad = |message: &str| HubError::BadName { name: text.to_string(), message: message.to_string() };
        let (path, revision) = match text.rsplit_once('@') {
            Some((path, revision)) => (path, revision),
            None => (text, "main"),
        };
        if revision.is_empty() || revision.split('/').any(|part| part.is_empty() || part == "." || part == "..") {
            return Err(bad("the revision is not a branch, tag or commit"));
        }
        let parts: Vec<&str> = path.split('/').collect();
        if parts.len() < 2 {
            return Err(bad("a hub model is named org/name"));
        }
        let name_ok = |part: &str| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if !parts.iter().all(|part| name_ok(part)) {
            return Err(bad("names may hold only letters, digits, `-`, `_` and `.`"));
        }
        let file = match &parts[2..] {
            [] => None,
            rest => {
                let file = rest.join("/");
                if !file.ends_with(".gguf") {
                    return Err(bad("a file inside a repository must be a .gguf file"));
                }
                Some(file)
            }
        };
        Ok(HubModel { repo: format!("{}/{}", parts[0], parts[1]), revision: revision.to_string(), file })
    }

    /// The URL of one of the repository's files.
    pub fn url(&self, endpoint: &str, file: &str) -> String {
        format!("{}/{}/resolve/{}/{file}", endpoint.trim_end_matches('/'), self.repo, self.revision)
    }

    /// The cache folder of this repository and revision.
    pub fn cache_dir(&self, cache: &Path) -> PathBuf {
        cache.join(format!("models--{}", self.repo.replace('/', "--"))).join(self.revision.replace('/', "--"))
    }
}

/// Why a hub model could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(
        "`hf:{name}` does not name a hub model: {message} (write hf:org/name, hf:org/name@revision or \
         hf:org/name/file.gguf)"
    )]
    BadName { name: String, message: String },
    #[error(
        "cannot download {url}: {message}. Download the model elsewhere and set `path` to its local folder \
         (or GGUF file) instead of `hf:`"
    )]
    Download { url: String, message: String },
    #[error(
        "{url} is not in the cache ({path}) and HF_HUB_OFFLINE is set; unset it, or set `path` to a local \
         folder (or GGUF file)"
    )]
    Offline { url: String, path: PathBuf },
    #[error("cannot write the download to {path}: {message}")]
    Write { path: PathBuf, message: String },
    #[error("no cache folder for hub downloads: set UNDERSTUDY_CACHE (or HOME), or set `path` to a local folder")]
    NoCache,
}

/// Fetches (or finds in the cache) the model `name` (what follows `hf:`) and
/// returns its local path: the folder of an HF model, or the GGUF file.
pub fn fetch(name: &str, options: &HubOptions) -> Result<PathBuf, HubError> {
    let model = HubModel::parse(name)?;
    let cache = options.cache_dir.as_deref().ok_or(HubError::NoCache)?;
    let dir = model.cache_dir(cache);
    let fetcher = Fetcher { model: &model, options, dir: &dir };
    // reqwest is async; its own runtime on its own thread works whether or
    // not the caller is inside one.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|error| {
                    HubError::Download { url: model.url(&options.endpoint, ""), message: error.to_string() }
                })?;
                runtime.block_on(fetcher.run())
            })
            .join()
            .unwrap_or_else(|_| {
                Err(HubError::Download {
                    url: model.url(&options.endpoint, ""),
                    message: "the download thread panicked".into(),
                })
            })
    })
}

struct Fetcher<'a> {
    model: &'a HubModel,
    options: &'a HubOptions,
    dir: &'a Path,
}

impl Fetcher<'_> {
    async fn run(&self) -> Result<PathBuf, HubError> {
        let client = reqwest::Client::builder()
            .user_agent(concat!("understudy/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|error| self.failed("", &error))?;
        if let Some(file) = &self.model.file {
            self.get(&client, file, true).await?;
            return Ok(self.dir.join(file));
        }
        let complete = self.dir.join(COMPLETE_MARKER);
        if complete.is_file() {
            return Ok(self.dir.to_path_buf());
        }
        self.get(&client, "config.json", true).await?;
        self.get(&client, "tokenizer.json", true).await?;
        self.get(&client, "tokenizer_config.json", false).await?;
        let index = "model.safetensors.index.json";
        let sharded = self.dir.join(index).is_file()
            || (!self.get(&client, "model.safetensors", false).await? && self.get(&client, index, false).await?);
        if sharded {
            for shard in shards(&self.dir.join(index)).map_err(|error| HubError::Download {
                url: self.model.url(&self.options.endpoint, index),
                message: error.to_string(),
            })? {
                self.get(&client, &shard, true).await?;
            }
        } else if !self.dir.join("model.safetensors").is_file() {
            return Err(HubError::Download {
                url: self.model.url(&self.options.endpoint, "model.safetensors"),
                message: format!(
                    "the repository has neither model.safetensors nor {index} (PyTorch .bin checkpoints are not \
                     supported)"
                ),
            });
        }
        std::fs::write(&complete, b"")
            .map_err(|error| HubError::Write { path: complete.clone(), message: error.to_string() })?;
        Ok(self.dir.to_path_buf())
    }

    fn failed(&self, file: &str, error: &dyn std::error::Error) -> HubError {
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        HubError::Download { url: self.model.url(&self.options.endpoint, file), message }
    }

    /// Downloads `file` unless the cache has it. `Ok(false)`: an optional
    /// file the repository does not have.
    async fn get(&self, client: &reqwest::Client, file: &str, required: bool) -> Result<bool, HubError> {
        let dest = self.dir.join(file);
        if dest.is_file() {
            return Ok(true);
        }
        let url = self.model.url(&self.options.endpoint, file);
        if self.options.offline {
            return if required { Err(HubError::Offline { url, path: dest }) } else { Ok(false) };
        }
        let mut request = client.get(&url);
        if let Some(token) = &self.options.token {
            request = request.bearer_auth(token);
        }
        let mut response = request.send().await.map_err(|error| self.failed(file, &error))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND && !required {
            return Ok(false);
        }
        if !status.is_success() {
            let why = match status.as_u16() {
                404 => "the hub has no such repository, revision or file",
                401 | 403 if self.options.token.is_some() => "the hub refused HF_TOKEN for this repository",
                401 | 403 => "the repository is private or gated: set HF_TOKEN to a token that may read it",
                _ => "the hub refused the request",
            };
            return Err(HubError::Download { url, message: format!("HTTP {status}: {why}") });
        }
        let parent = dest.parent().unwrap_or(self.dir);
        let write_error = |error: std::io::Error| HubError::Write { path: dest.clone(), message: error.to_string() };
        std::fs::create_dir_all(parent).map_err(write_error)?;
        let mut part = tempfile::Builder::new().prefix(".download-").tempfile_in(parent).map_err(write_error)?;
        while let Some(chunk) = response.chunk().await.map_err(|error| self.failed(file, &error))? {
            part.write_all(&chunk).map_err(write_error)?;
        }
        part.as_file().sync_all().map_err(write_error)?;
        part.persist(&dest).map_err(|error| write_error(error.error))?;
        Ok(true)
    }
}

/// The shard files a `model.safetensors.index.json` names (plain file names only).
fn shards(index: &Path) -> Result<Vec<String>, BadIndex> {
    let text = std::fs::read_to_string(index)?;
    let value: Value = serde_json::from_str(&text)?;
    let map = value.get("weight_map").and_then(Value::as_object).ok_or(BadIndex::NoWeightMap)?;
    let mut files: Vec<String> = map.values().filter_map(Value::as_str).map(str::to_string).collect();
    files.sort();
    files.dedup();
    if let Some(bad) = files.iter().find(|file| file.contains('/') || file.contains('\\') || file.starts_with('.')) {
        return Err(BadIndex::NotNextToIt(bad.clone()));
    }
    if files.is_empty() {
        return Err(BadIndex::NoShards);
    }
    Ok(files)
}

/// Why a `model.safetensors.index.json` names no usable shards.
#[derive(Debug, thiserror::Error)]
enum BadIndex {
    #[error("{0}")]
    Read(#[from] std::io::Error),
    #[error("not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("no `weight_map`")]
    NoWeightMap,
    #[error("the index names `{0}`, which is not a file next to it")]
    NotNextToIt(String),
    #[error("the index names no shards")]
    NoShards,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_with_revisions_and_files() {
        let parsed = HubModel::parse("HuggingFaceTB/SmolLM2-135M-Instruct").unwrap();
        assert_eq!(
            parsed,
            HubModel { repo: "HuggingFaceTB/SmolLM2-135M-Instruct".into(), revision: "main".into(), file: None }
        );
        let parsed = HubModel::parse("org/name@v1.0").unwrap();
        assert_eq!((parsed.revision.as_str(), parsed.file), ("v1.0", None));
        let parsed = HubModel::parse("org/name/q4/model.Q4_1.gguf@refs/pr/3").unwrap();
        assert_eq!(parsed.file.as_deref(), Some("q4/model.Q4_1.gguf"));
        assert_eq!(parsed.url("http://hub/", "x"), "http://hub/org/name/resolve/refs/pr/3/x");
        assert_eq!(parsed.cache_dir(Path::new("/c")), Path::new("/c/models--org--name/refs--pr--3"));
        for bad in ["name", "org/", "org/../x", "org/name/weights.bin", "org/name@", "org/na me", "org/name@../x"] {
            let error = HubModel::parse(bad).unwrap_err().to_string();
            assert!(error.contains(&format!("hf:{bad}")), "{error}");
        }
    }

    #[test]
    fn the_token_is_not_printed() {
        let options = HubOptions {
            endpoint: DEFAULT_ENDPOINT.into(),
            token: Some("hf_secret".into()),
            cache_dir: None,
            offline: false,
        };
        assert!(!format!("{options:?}").contains("hf_secret"));
    }
}
