//! `config.json` of `nvidia/llama-nemotron-rerank-1b-v2` (model_type `llama_bidirec`).
//!
//! The serde struct mirrors the Hugging Face file; [`ModelConfig::validate`] refuses every value the
//! forward pass does not implement, naming the value, so a checkpoint we would compute wrongly never loads.

use serde::Deserialize;
use std::path::Path;

use super::ModelError;

/// The Hugging Face `config.json`, as published with the model (see `docs/model.md` §1).
#[derive(Debug, Clone, Deserialize)]
pub struct ModelConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// GQA: defaults to `num_attention_heads` (plain multi-head attention) as in transformers.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Read from the file when present; transformers falls back to hidden/heads.
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_pooling")]
    pub pooling: String,
    /// The score head's logit is divided by this (0.2 in the released checkpoint).
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub torch_dtype: Option<String>,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_position_embeddings() -> usize {
    2048
}
fn default_pooling() -> String {
    // `LlamaBidirectionalConfig.__init__` default.
    "avg".to_string()
}
fn default_temperature() -> f64 {
    // `LlamaBidirectionalConfig.__init__` default; the released config.json says 0.2.
    1.0
}
fn default_hidden_act() -> String {
    "silu".to_string()
}

/// Llama-3 frequency scaling (`rope_type: "llama3"`), transformers `_compute_llama3_parameters`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        read_validated(path, Self::validate)
    }

    /// Refuses every setting the forward pass does not implement.
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.model_type != "llama_bidirec" {
            return Err(ModelError::Unsupported {
                field: "model_type",
                value: self.model_type.clone(),
                supported: "llama_bidirec",
            });
        }
        if self.pooling != "avg" {
            return Err(ModelError::Unsupported {
                field: "pooling",
                value: self.pooling.clone(),
                supported: "avg",
            });
        }
        if self.hidden_act != "silu" {
            return Err(ModelError::Unsupported {
                field: "hidden_act",
                value: self.hidden_act.clone(),
                supported: "silu",
            });
        }
        if self.attention_bias || self.mlp_bias {
            return Err(ModelError::Unsupported {
                field: "attention_bias/mlp_bias",
                value: "true".into(),
                supported: "false",
            });
        }
        self.rope_scaling()?;
        let bad = |message: String| ModelError::Config {
            path: Default::default(),
            message,
        };
        if self.hidden_size == 0 || self.num_attention_heads == 0 || self.num_hidden_layers == 0 {
            return Err(bad(
                "hidden_size, num_attention_heads and num_hidden_layers must be positive".into(),
            ));
        }
        let kv = self.num_key_value_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return Err(bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {kv}",
                self.num_attention_heads
            )));
        }
        if !self.head_dim().is_multiple_of(2) || self.head_dim() == 0 {
            return Err(bad(format!(
                "head_dim {} must be even and positive for rotary embeddings",
                self.head_dim()
            )));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(bad(format!(
                "temperature {} must be a positive number",
                self.temperature
            )));
        }
        Ok(())
    }

    pub fn num_key_value_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Token used to fill padded slots; its value is irrelevant (padding is masked) but must be in the vocabulary.
    pub fn pad_token_id(&self) -> u32 {
        self.pad_token_id.unwrap_or(0)
    }

    /// The parsed `rope_scaling` block. `None` means plain RoPE.
    pub fn rope_scaling(&self) -> Result<Option<Llama3RopeScaling>, ModelError> {
        let Some(value) = &self.rope_scaling else {
            return Ok(None);
        };
        if value.is_null() {
            return Ok(None);
        }
        // transformers accepts the legacy key `type` as well as `rope_type`.
        let rope_type = value
            .get("rope_type")
            .or_else(|| value.get("type"))
            .and_then(|v| v.as_str())
            .unwrap_or("<missing>");
        match rope_type {
            "default" => Ok(None),
            "llama3" => {
                let field = |name: &str| -> Result<f64, ModelError> {
                    value
                        .get(name)
                        .and_then(|v| v.as_f64())
                        .ok_or_else(|| ModelError::Config {
                            path: Default::default(),
                            message: format!(
                                "rope_scaling of type llama3 needs a numeric `{name}`"
                            ),
                        })
                };
                let scaling = Llama3RopeScaling {
                    factor: field("factor")?,
                    low_freq_factor: field("low_freq_factor")?,
                    high_freq_factor: field("high_freq_factor")?,
                    original_max_position_embeddings: field("original_max_position_embeddings")?
                        as usize,
                };
                if scaling.high_freq_factor <= scaling.low_freq_factor
                    || scaling.factor <= 0.0
                    || scaling.original_max_position_embeddings == 0
                {
                    return Err(ModelError::Config {
                        path: Default::default(),
                        message: format!("inconsistent llama3 rope_scaling {value}"),
                    });
                }
                Ok(Some(scaling))
            }
            other => Err(ModelError::Unsupported {
                field: "rope_scaling.rope_type",
                value: other.to_string(),
                supported: "llama3, default",
            }),
        }
    }

    /// The full-size `nvidia/llama-nemotron-rerank-1b-v2` configuration, for `--random-weights`.
    #[allow(clippy::expect_used)]
    pub fn nemotron_rerank_1b_v2() -> Self {
        serde_json::from_value(serde_json::json!({
            "model_type": "llama_bidirec",
            "vocab_size": 128256,
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            "max_position_embeddings": 131072,
            "pooling": "avg",
            "temperature": 0.2,
            "tie_word_embeddings": true,
            "torch_dtype": "bfloat16",
            "bos_token_id": 128000,
            "eos_token_id": 128001,
            "pad_token_id": 128001
        }))
        .expect("the built-in 1B config is valid JSON for ModelConfig. This is a bug.")
    }
}

/// Reads a `config.json` into `T` and checks it with `validate`; errors name the file.
pub(crate) fn read_validated<T: serde::de::DeserializeOwned>(
    path: &Path,
    validate: impl FnOnce(&T) -> Result<(), ModelError>,
) -> Result<T, ModelError> {
    let in_file = |message: String| ModelError::Config {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let config: T = serde_json::from_str(&text).map_err(|e| in_file(e.to_string()))?;
    validate(&config).map_err(|e| match e {
        ModelError::Config { message, .. } => in_file(message),
        other => other,
    })?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(patch: serde_json::Value) -> Result<ModelConfig, ModelError> {
        let mut base = serde_json::to_value(serde_json::json!({
            "model_type": "llama_bidirec", "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "rms_norm_eps": 1e-5
        }))
        .unwrap();
        for (k, v) in patch.as_object().unwrap() {
            base[k] = v.clone();
        }
        let c: ModelConfig = serde_json::from_value(base).map_err(|e| ModelError::Config {
            path: Default::default(),
            message: e.to_string(),
        })?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn full_size_config_is_valid() {
        let c = ModelConfig::nemotron_rerank_1b_v2();
        c.validate().unwrap();
        assert_eq!(c.head_dim(), 64);
        assert_eq!(c.num_key_value_heads(), 8);
        assert_eq!(c.temperature, 0.2);
    }

    #[test]
    fn unknown_values_are_named() {
        let e = with(serde_json::json!({"pooling": "cls"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("pooling `cls`"), "{e}");
        let e = with(serde_json::json!({"model_type": "bert"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("model_type `bert`"), "{e}");
        let e = with(serde_json::json!({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rope_type `yarn`"), "{e}");
    }

    #[test]
    fn llama3_scaling_needs_all_fields() {
        let e = with(serde_json::json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("low_freq_factor"), "{e}");
        let c = with(serde_json::json!({"rope_scaling": {"type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}))
        .unwrap();
        assert!(c.rope_scaling().unwrap().is_some());
    }

    #[test]
    fn defaults_follow_transformers() {
        let c = with(serde_json::json!({})).unwrap();
        assert_eq!(c.num_key_value_heads(), 2);
        assert_eq!(c.head_dim(), 4);
        assert_eq!(c.temperature, 1.0);
        let e = with(serde_json::json!({"num_key_value_heads": 3}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("multiple"), "{e}");
        let e = with(serde_json::json!({"temperature": 0.0}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("temperature"), "{e}");
    }
}
