//! Qwen3 (dense): Qwen3-0.6B ... Qwen3-32B.
//!
//! Differences from Qwen2 that the shared [`crate::decoder`] switches on:
//! - per-head RMSNorm on queries and keys (`q_norm`, `k_norm`, weight `[head_dim]`), applied
//!   after the projection and before RoPE;
//! - `head_dim` is an explicit config field (128 for every released size, so
//!   `num_attention_heads * head_dim` need not equal `hidden_size`);
//! - no q/k/v bias unless `attention_bias` is set.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::CommonConfig;
use crate::decoder::DecoderConfig;
use crate::Result;

/// The fields of a Qwen3 `config.json` that opsa reads; names verbatim from Hugging Face.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Qwen3Config {
    #[serde(flatten)]
    pub common: CommonConfig,
    pub head_dim: Option<usize>,
    #[serde(default)]
    pub attention_bias: bool,
}

impl Qwen3Config {
    pub fn decoder(&self, raw: &Value, path: &Path) -> Result<DecoderConfig> {
        let d = self.common.decoder(raw, path, self.head_dim, 1_000_000.0)?;
        Ok(DecoderConfig { qkv_bias: self.attention_bias, o_bias: self.attention_bias, qk_norm: true, ..d })
    }
}
