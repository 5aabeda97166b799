//! Qwen2: the architecture of DeepSeek-R1-Distill-Qwen-{1.5B,7B,14B,32B} and Qwen2.5.
//!
//! Differences from Qwen3 that the shared [`crate::decoder`] switches on:
//! - `q_proj`, `k_proj`, `v_proj` carry a bias (`o_proj` does not);
//! - no per-head q/k RMSNorm;
//! - `head_dim = hidden_size / num_attention_heads` (not a config field).

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::CommonConfig;
use crate::decoder::DecoderConfig;
use crate::Result;

/// The fields of a Qwen2 `config.json` that opsa reads; names verbatim from Hugging Face.
/// Fields not listed are kept in the raw JSON and written back on save.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Qwen2Config {
    #[serde(flatten)]
    pub common: CommonConfig,
}

impl Qwen2Config {
    pub fn decoder(&self, raw: &Value, path: &Path) -> Result<DecoderConfig> {
        Ok(DecoderConfig { qkv_bias: true, ..self.common.decoder(raw, path, None, 10_000.0)? })
    }
}
