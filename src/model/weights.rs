//! Where the model comes from: a local directory in Hugging Face layout, a Hub repo (through
//! `hf-hub`, honouring `HF_ENDPOINT`, `HF_HOME`, `HF_TOKEN` and `HF_HUB_OFFLINE`), or random weights of
//! the full-size architecture for benchmarks.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};

use super::{CrossEncoder, ModelConfig, ModelError};

/// The Hub repo served by default.
pub const DEFAULT_MODEL_ID: &str = "nvidia/llama-nemotron-rerank-1b-v2";

const CONFIG: &str = "config.json";
const TOKENIZER: &str = "tokenizer.json";
const SINGLE_WEIGHTS: &str = "model.safetensors";
const SHARDED_INDEX: &str = "model.safetensors.index.json";

/// The files of one model, all on local disk.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub config: PathBuf,
    pub tokenizer: PathBuf,
    pub weights: Vec<PathBuf>,
}

impl ModelFiles {
    /// Files of a local directory in Hugging Face layout.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        if !dir.is_dir() {
            return Err(ModelError::NotFound(dir.to_path_buf()));
        }
        let require = |name: &str, context: &'static str| -> Result<PathBuf, ModelError> {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(ModelError::MissingFile { path, context })
            }
        };
        let config = require(CONFIG, "the model configuration")?;
        let tokenizer = require(TOKENIZER, "the tokenizer")?;
        let weights = if dir.join(SINGLE_WEIGHTS).is_file() {
            vec![dir.join(SINGLE_WEIGHTS)]
        } else {
            let index = require(SHARDED_INDEX, "neither model.safetensors nor a shard index")?;
            shard_names(&index)?
                .into_iter()
                .map(|name| require(&name, "a weight shard named in the index"))
                .collect::<Result<_, _>>()?
        };
        Ok(Self {
            config,
            tokenizer,
            weights,
        })
    }

    /// Downloads (or finds in the cache) the files of a Hub repo.
    pub async fn from_hub(repo: &str, revision: &str) -> Result<Self, ModelError> {
        let hub_error = |message: String| ModelError::Hub {
            repo: repo.to_string(),
            revision: revision.to_string(),
            message,
        };
        let hf_repo = hf_hub::Repo::with_revision(
            repo.to_string(),
            hf_hub::RepoType::Model,
            revision.to_string(),
        );
        if hub_offline() {
            let cache = hf_hub::Cache::from_env().repo(hf_repo);
            let get = |name: &str| {
                cache.get(name).ok_or_else(|| {
                    hub_error(format!(
                        "{name} is not in the local cache and HF_HUB_OFFLINE is set"
                    ))
                })
            };
            let weights = match cache.get(SINGLE_WEIGHTS) {
                Some(path) => vec![path],
                None => shard_names(&get(SHARDED_INDEX)?)?
                    .iter()
                    .map(|n| get(n))
                    .collect::<Result<_, _>>()?,
            };
            return Ok(Self {
                config: get(CONFIG)?,
                tokenizer: get(TOKENIZER)?,
                weights,
            });
        }
        let mut builder = hf_hub::api::tokio::ApiBuilder::from_env().with_progress(false);
        if let Ok(token) = std::env::var("HF_TOKEN") {
            if !token.is_empty() {
                builder = builder.with_token(Some(token));
            }
        }
        let api = builder.build().map_err(|e| hub_error(e.to_string()))?;
        let api = api.repo(hf_repo);
        let config = api
            .get(CONFIG)
            .await
            .map_err(|e| hub_error(format!("{CONFIG}: {e}")))?;
        let tokenizer = api
            .get(TOKENIZER)
            .await
            .map_err(|e| hub_error(format!("{TOKENIZER}: {e}")))?;
        let weights = match api.get(SINGLE_WEIGHTS).await {
            Ok(path) => vec![path],
            Err(single_err) => {
                let index = api.get(SHARDED_INDEX).await.map_err(|e| {
                    hub_error(format!(
                        "{SINGLE_WEIGHTS}: {single_err}; {SHARDED_INDEX}: {e}"
                    ))
                })?;
                let mut paths = Vec::new();
                for name in shard_names(&index)? {
                    paths.push(
                        api.get(&name)
                            .await
                            .map_err(|e| hub_error(format!("{name}: {e}")))?,
                    );
                }
                paths
            }
        };
        Ok(Self {
            config,
            tokenizer,
            weights,
        })
    }

    /// A local directory when `model` names one, otherwise a Hub repo id.
    pub async fn resolve(model: &str, revision: &str) -> Result<Self, ModelError> {
        let path = Path::new(model);
        if path.exists() {
            return Self::from_dir(path);
        }
        if looks_like_repo_id(model) {
            return Self::from_hub(model, revision).await;
        }
        Err(ModelError::NotFound(path.to_path_buf()))
    }

    /// Memory-maps the weights into a model on `device`, computing in `dtype`.
    pub fn load_model(
        &self,
        config: &ModelConfig,
        dtype: DType,
        device: &Device,
        max_positions: usize,
    ) -> Result<CrossEncoder, ModelError> {
        let files = self
            .weights
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let weights_error = |source| ModelError::Weights {
            files: files.clone(),
            source,
        };
        // SAFETY: the files are memory-mapped read-only; like every safetensors loader we rely on
        // nobody truncating or rewriting them while the process runs (the HF cache never does).
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&self.weights, dtype, device) }
            .map_err(weights_error)?;
        CrossEncoder::load(vb, config, max_positions).map_err(weights_error)
    }
}

/// `org/name` with no leading `.` or `/`: what the Hub accepts as a model id.
fn looks_like_repo_id(model: &str) -> bool {
    let mut parts = model.split('/');
    matches!((parts.next(), parts.next(), parts.next()),
        (Some(org), Some(name), None) if !org.is_empty() && !name.is_empty() && !org.starts_with('.'))
}

fn hub_offline() -> bool {
    matches!(
        std::env::var("HF_HUB_OFFLINE").as_deref(),
        Ok("1") | Ok("true") | Ok("TRUE") | Ok("yes")
    )
}

/// Distinct shard file names of a `model.safetensors.index.json`, in a stable order.
fn shard_names(index: &Path) -> Result<Vec<String>, ModelError> {
    let text = std::fs::read_to_string(index).map_err(|source| ModelError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: index.to_path_buf(),
        message: e.to_string(),
    })?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::Config {
            path: index.to_path_buf(),
            message: "no `weight_map` object".into(),
        })?;
    let mut names: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    if names.iter().any(|n| n.contains('/') || n.contains("..")) {
        return Err(ModelError::Config {
            path: index.to_path_buf(),
            message: "shard names must be plain file names".into(),
        });
    }
    Ok(names)
}

/// The full architecture with random weights (no download), for benchmarks. Seeded on CPU.
pub fn random_model(
    config: &ModelConfig,
    dtype: DType,
    device: &Device,
    max_positions: usize,
) -> Result<CrossEncoder, ModelError> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, device);
    Ok(CrossEncoder::load(vb, config, max_positions)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_recognised() {
        assert!(looks_like_repo_id("nvidia/llama-nemotron-rerank-1b-v2"));
        assert!(!looks_like_repo_id("./models/x"));
        assert!(!looks_like_repo_id("/abs/path"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("plain"));
    }
}
