//! What the benchmarks share: the ~42M-parameter Qwen3-shaped model and environment knobs.

use opsa_models::DecoderConfig;

/// vocab 32768, hidden 512, 8 layers, 8 query / 4 KV heads of 64, tied embeddings (~42M).
pub fn config() -> DecoderConfig {
    DecoderConfig {
        vocab_size: 32768,
        hidden_size: 512,
        intermediate_size: 1536,
        num_hidden_layers: 8,
        num_attention_heads: 8,
        num_key_value_heads: 4,
        head_dim: 64,
        max_position_embeddings: 4096,
        rms_norm_eps: 1e-6,
        rope_theta: 1_000_000.0,
        rope_scaling: opsa_models::rope::RopeScaling::Default,
        tie_word_embeddings: true,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        qk_norm: true,
    }
}

pub fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}
