//! Prefill and decode throughput on a random Qwen3-shaped model of ~42M parameters
//! (vocab 32768, hidden 512, 8 layers, 8 query / 4 KV heads of 64, tied embeddings).
//!
//!     cargo bench --bench generate                     # ndarray
//!     cargo bench --bench generate --features flex     # ndarray and flex
//!     python3 benches/generate_torch.py                # the same through PyTorch + transformers
//!
//! Prints one JSON line per (backend, batch); compare with the PyTorch script's lines, run on
//! the same machine in the same session (these machines are shared and noisy: report ratios).
//! Environment: OPSA_BENCH_PROMPT (prompt tokens, default 128), OPSA_BENCH_NEW (decode tokens,
//! default 64), OPSA_BENCH_BATCHES (default "1,8"), OPSA_BENCH_BACKENDS (e.g. `flex`;
//! default every compiled one).

#[path = "common/mod.rs"]
mod common;
use common::{config, cpu_seconds, env_usize, want};
use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use opsa_generate::{generate, SamplingParams};
use opsa_models::checkpoint::random_model;
use opsa_models::decoder::Positions;
use opsa_models::WeightDType;

fn bench<B: Backend>(name: &str, device: &B::Device) {
    let cfg = config();
    let model = random_model::<B>(&cfg, 0, WeightDType::F32, device).unwrap();
    let (plen, new) = (env_usize("OPSA_BENCH_PROMPT", 128), env_usize("OPSA_BENCH_NEW", 64));
    let batches: Vec<usize> = std::env::var("OPSA_BENCH_BATCHES")
        .unwrap_or_else(|_| "1,8".into())
        .split(',')
        .map(|s| s.trim().parse().unwrap())
        .collect();
    for &b in &batches {
        let prompts: Vec<Vec<u32>> =
            (0..b).map(|r| (0..plen).map(|j| ((r * 7919 + j * 104_729) % cfg.vocab_size) as u32).collect()).collect();
        // Prefill: one forward over the whole prompt batch, logits of the last position (as generation does).
        let prefill = |warm: bool| {
            let ids: Vec<i64> = prompts.iter().flatten().map(|&t| t as i64).collect();
            let t0 = Instant::now();
            let x = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, plen]), device);
            let h = model.forward_hidden(x, &Positions::causal(b, plen), None);
            let logits = model.logits(h.narrow(1, plen - 1, 1));
            let _ = logits.into_data();
            if !warm {
                return 0.0;
            }
            t0.elapsed().as_secs_f64()
        };
        prefill(false);
        let reps = 3;
        let (w0, c0) = (Instant::now(), cpu_seconds());
        let t_prefill = (0..reps).map(|_| prefill(true)).fold(f64::INFINITY, f64::min);
        let prefill_cores = (cpu_seconds() - c0) / w0.elapsed().as_secs_f64();
        // Decode: greedy generation of `new` tokens (no EOS), minus its prefill.
        let params = SamplingParams { max_new_tokens: new, ..Default::default() };
        let idx: Vec<u64> = (0..b as u64).collect();
        let run = || {
            let t0 = Instant::now();
            let g = generate(&model, &prompts, &idx, &params, &[], None).unwrap();
            assert!(g.iter().all(|g| g.token_ids.len() == new));
            t0.elapsed().as_secs_f64()
        };
        let (w1, c1) = (Instant::now(), cpu_seconds());
        let t_gen = (0..2).map(|_| run()).fold(f64::INFINITY, f64::min);
        let generate_cores = (cpu_seconds() - c1) / w1.elapsed().as_secs_f64();
        let t_decode = (t_gen - t_prefill).max(1e-9);
        println!(
            "{{\"impl\":\"opsa\",\"backend\":\"{name}\",\"params_m\":{:.1},\"batch\":{b},\"prompt\":{plen},\"new\":{new},\"prefill_tok_s\":{:.1},\"decode_tok_s\":{:.1},\"prefill_cores\":{prefill_cores:.2},\"generate_cores\":{generate_cores:.2}}}",
            cfg.num_parameters() as f64 / 1e6,
            (b * plen) as f64 / t_prefill,
            (b * (new - 1)) as f64 / t_decode,
        );
    }
}

fn main() {
    common::configure_allocator();
    #[cfg(feature = "ndarray")]
    if want("ndarray") {
        bench::<burn::backend::NdArray>("ndarray", &Default::default());
    }
    #[cfg(feature = "flex")]
    if want("flex") {
        bench::<burn::backend::Flex>("flex", &Default::default());
    }
    #[cfg(feature = "wgpu")]
    if want("wgpu") {
        bench::<burn::backend::Wgpu>("wgpu", &Default::default());
    }
    #[cfg(feature = "cuda")]
    if want("cuda") {
        bench::<burn::backend::Cuda>("cuda", &Default::default());
    }
}
