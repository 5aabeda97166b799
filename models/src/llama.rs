//! Llama (`LlamaForCausalLM`): DeepSeek-R1-Distill-Llama-{8B,70B}, Llama-3.x.
//!
//! What the shared [`crate::decoder`] switches on for this family:
//! - no q/k/v/o bias unless `attention_bias` (then all four have one);
//! - `mlp_bias`: `gate_proj`, `up_proj` and `down_proj` with a bias;
//! - no per-head q/k norm;
//! - `head_dim` from the config when given, else `hidden_size / num_attention_heads`;
//! - an untied `lm_head` (unless `tie_word_embeddings`, as in Llama-3.2-1B/3B);
//! - `rope_scaling` of type `llama3` (Llama 3.1 and later, R1-Distill-Llama), `linear` or
//!   `default`; see [`crate::rope`].

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::CommonConfig;
use crate::decoder::DecoderConfig;
use crate::Result;

/// The fields of a Llama `config.json` that opsa reads; names verbatim from Hugging Face.
/// `rope_theta` / `rope_scaling` are read from the raw JSON by [`crate::rope::from_raw`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LlamaConfig {
    #[serde(flatten)]
    pub common: CommonConfig,
    pub head_dim: Option<usize>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
}

impl LlamaConfig {
    pub fn decoder(&self, raw: &Value, path: &Path) -> Result<DecoderConfig> {
        let d = self.common.decoder(raw, path, self.head_dim, 10_000.0)?;
        Ok(DecoderConfig { qkv_bias: self.attention_bias, o_bias: self.attention_bias, mlp_bias: self.mlp_bias, ..d })
    }
}
