//! What the benchmarks share: the ~42M-parameter Qwen3-shaped model, environment knobs, token
//! rows as tensors and the process's resident memory.
#![allow(dead_code)] // each bench uses its own part

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use opsa_models::DecoderConfig;

// The binary's allocator (mimalloc), so that the benchmarks measure what `opsa` runs.
#[path = "../../src/allocator.rs"]
mod allocator;
pub use allocator::configure as configure_allocator;

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

/// Equal-length token rows as a `[rows, t]` tensor.
pub fn ids<B: Backend>(rows: &[Vec<u32>], device: &B::Device) -> Tensor<B, 2, Int> {
    let t = rows[0].len();
    let data: Vec<i64> = rows.iter().flatten().map(|&x| x as i64).collect();
    Tensor::from_data(TensorData::new(data, [rows.len(), t]), device)
}

fn status_bytes(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 1024
}

/// Resident memory now, in bytes.
pub fn rss() -> u64 {
    status_bytes("VmRSS:")
}

/// Peak resident memory since the last [`reset_peak`], in bytes.
pub fn peak_rss() -> u64 {
    status_bytes("VmHWM:")
}

/// Set the peak to the current resident memory.
pub fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// OPSA_BENCH_BACKENDS: whether to run the compiled backend `name` (default: every compiled one).
pub fn want(name: &str) -> bool {
    std::env::var("OPSA_BENCH_BACKENDS").map_or(true, |v| v.split(',').any(|b| b.trim() == name))
}

/// CPU time (user + system) of the whole process so far, in seconds; with wall time it says
/// how many cores a phase kept busy. Linux `/proc/self/stat` in USER_HZ ticks (100 per second).
pub fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split_whitespace().skip(11).take(2).filter_map(|v| v.parse().ok()).collect();
    f.iter().sum::<u64>() as f64 / 100.0
}
