//! The cross-encoder in candle: configuration, weights, tokenization and the forward pass.
//!
//! Knows nothing of NATS, HTTP, queues or wire formats; takes a device and a dtype from its caller.

mod attention;
mod bert_encoder;
mod config;
mod cpu_kernels;
mod cross_encoder;
mod error;
pub mod family;
mod layers;
mod packed;
mod rope;
mod tokenizer;
mod weights;

pub use config::{Llama3RopeScaling, ModelConfig};
pub use cross_encoder::CrossEncoder;
pub use error::ModelError;
pub use family::{Family, LoadedModel, PairEncoder, Reranker, SequenceRef};
pub use rope::inverse_frequencies;
pub use tokenizer::{
    ChunkPolicy, EncodePairsError, EncodedPair, EncodedQuery, PairTokenizer, QueryTooLong,
    TokenizeWork, TooLong, Truncation, UnsupportedPair, DEFAULT_CHUNK_OVERLAP,
    DEFAULT_MAX_CHUNKS_PER_DOC, MAX_SUPPORTED_LENGTH,
};
pub use weights::{random_model, ModelFiles, DEFAULT_MODEL_ID};

use candle_core::{DType, Device};

/// What a running model reports in health checks and service metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    pub name: String,
    pub device: String,
    pub dtype: String,
    pub max_length: usize,
}

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device, ModelError> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda_device(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => cuda_device(ordinal),
            _ => Err(ModelError::Device(format!(
                "unknown device `{other}` (expected cpu, cuda or cuda:N)"
            ))),
        },
    }
}

fn cuda_device(ordinal: usize) -> Result<Device, ModelError> {
    Device::new_cuda(ordinal).map_err(|e| {
        ModelError::Device(format!(
            "cuda:{ordinal} unavailable ({e}); this binary was built {} the `cuda` feature",
            if cfg!(feature = "cuda") {
                "with"
            } else {
                "without"
            }
        ))
    })
}

/// A device's name as reported in health and metadata: `cpu` or `cuda:N`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Parses `f32`, `bf16` or `f16`.
pub fn parse_dtype(spec: &str) -> Result<DType, ModelError> {
    match spec {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        other => Err(ModelError::Dtype(other.to_string())),
    }
}

/// The compute dtype used when none is asked for: f32 on CPU (exact), bf16 on GPUs.
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}

pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "other",
    }
}
