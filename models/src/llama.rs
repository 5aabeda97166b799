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

use crate::config::{check_act, check_no_sliding_window};
use crate::decoder::DecoderConfig;
use crate::qwen2::silu;
use crate::Result;

/// The fields of a Llama `config.json` that opsa reads; names verbatim from Hugging Face.
/// `rope_theta` / `rope_scaling` are read from the raw JSON by [`crate::rope::from_raw`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LlamaConfig {
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
    pub mlp_bias: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "silu")]
    pub hidden_act: String,
}

impl LlamaConfig {
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
            head_dim: self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1)),
            max_position_embeddings: self.max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias: self.attention_bias,
            o_bias: self.attention_bias,
            mlp_bias: self.mlp_bias,
            qk_norm: false,
        })
    }
}
