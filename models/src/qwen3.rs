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

use crate::config::{check_act, check_no_sliding_window};
use crate::decoder::DecoderConfig;
use crate::qwen2::silu;
use crate::Result;

/// The fields of a Qwen3 `config.json` that opsa reads; names verbatim from Hugging Face.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Qwen3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "silu")]
    pub hidden_act: String,
}

impl Qwen3Config {
    pub fn decoder(&self, raw: &Value, path: &Path) -> Result<DecoderConfig> {
        check_act(&self.hidden_act, path)?;
        check_no_sliding_window(raw, self.num_hidden_layers, self.max_position_embeddings, path)?;
        let (rope_theta, rope_scaling) = crate::rope::from_raw(raw, 1_000_000.0, path)?;
        Ok(DecoderConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1)),
            max_position_embeddings: self.max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias: self.attention_bias,
            o_bias: self.attention_bias,
            mlp_bias: false,
            qk_norm: true,
        })
    }
}
