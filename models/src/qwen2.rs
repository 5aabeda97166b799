//! Qwen2: the architecture of DeepSeek-R1-Distill-Qwen-{1.5B,7B,14B,32B} and Qwen2.5.
//!
//! Differences from Qwen3 that the shared [`crate::decoder`] switches on:
//! - `q_proj`, `k_proj`, `v_proj` carry a bias (`o_proj` does not);
//! - no per-head q/k RMSNorm;
//! - `head_dim = hidden_size / num_attention_heads` (not a config field).

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{check_act, check_no_sliding_window};
use crate::decoder::DecoderConfig;
use crate::Result;

/// The fields of a Qwen2 `config.json` that opsa reads; names verbatim from Hugging Face.
/// Fields not listed are kept in the raw JSON and written back on save.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Qwen2Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "silu")]
    pub hidden_act: String,
}

pub(crate) fn silu() -> String {
    "silu".into()
}

impl Qwen2Config {
    pub fn decoder(&self, raw: &Value, path: &Path) -> Result<DecoderConfig> {
        check_act(&self.hidden_act, path)?;
        check_no_sliding_window(raw, self.num_hidden_layers, self.max_position_embeddings, path)?;
        let (rope_theta, rope_scaling) = crate::rope::from_raw(raw, 10_000.0, path)?;
        Ok(DecoderConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self.hidden_size / self.num_attention_heads.max(1),
            max_position_embeddings: self.max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias: true,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
        })
    }
}
