//! One OPSA step on a random Qwen3-shaped model of ~42M parameters (vocab 32768), CPU:
//! rollout tokens/s, teacher + student forward/backward tokens/s, and the peak memory of the
//! full-vocabulary divergence as the response grows (it must follow the chunk size, not the
//! sequence length).
//!
//!     cargo bench --bench opsa_step --features flex      # ndarray and flex
//!     python3 benches/opsa_step_torch.py                 # the same step in PyTorch + transformers
//!
//! Environment: OPSA_BENCH_BATCH (rollouts, default 4), OPSA_BENCH_PROMPT (default 64),
//! OPSA_BENCH_NEW (default 128), OPSA_BENCH_BACKENDS (e.g. `flex`; default all compiled),
//! OPSA_BENCH_RECOMPUTE (1: activation recompute in the training
//! pass; its cost in time is the ratio of train_tok_s with 0 and 1).

#[path = "common/mod.rs"]
mod common;
use common::{config, cpu_seconds, env_usize, ids, peak_rss, reset_peak, rss, want};
use std::time::Instant;

use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use opsa_distill::{backward_chunked, Divergence, DivergenceKind, Targets};
use opsa_generate::{generate, SamplingParams};
use opsa_models::checkpoint::random_model;
use opsa_models::decoder::Positions;
use opsa_models::WeightDType;

const MIB: f64 = 1024.0 * 1024.0;

fn step<B: AutodiffBackend>(name: &str, device: &B::Device) {
    let cfg = config();
    let (b, plen, new) = (env_usize("OPSA_BENCH_BATCH", 4), env_usize("OPSA_BENCH_PROMPT", 64), env_usize("OPSA_BENCH_NEW", 128));
    let recompute = env_usize("OPSA_BENCH_RECOMPUTE", 0) == 1;
    let mut student = random_model::<B>(&cfg, 0, WeightDType::F32, device).unwrap();
    let teacher = student.valid();
    let mut optim = AdamWConfig::new().with_epsilon(1e-8).with_weight_decay(0.01).init::<B, opsa_models::CausalLm<B>>();
    let div = Divergence::default(); // mixed α = 0.5, top-64
    let prompts: Vec<Vec<u32>> = (0..b).map(|r| (0..plen).map(|j| ((r * 7919 + j * 104_729) % cfg.vocab_size) as u32).collect()).collect();
    // Teacher prompt = 16 context tokens + the student prompt.
    let ctx: Vec<u32> = (0..16).map(|j| (j * 31 + 5) as u32).collect();
    for round in 0..2 {
        // Rollouts (sampled at T = 1, no EOS so every row has `new` tokens).
        let (t0, c0) = (Instant::now(), cpu_seconds());
        let params = SamplingParams { temperature: 1.0, max_new_tokens: new, seed: round, ..Default::default() };
        let idx: Vec<u64> = (0..b as u64).collect();
        let gens = generate(&student.valid(), &prompts, &idx, &params, &[], None).unwrap();
        let t_roll = t0.elapsed().as_secs_f64();
        let c_roll = cpu_seconds() - c0;
        // Teacher forward + student forward/backward + AdamW.
        let (t1, c1) = (Instant::now(), cpu_seconds());
        let s_rows: Vec<Vec<u32>> = prompts.iter().zip(&gens).map(|(p, g)| p.iter().chain(&g.token_ids).copied().collect()).collect();
        let t_rows: Vec<Vec<u32>> = s_rows.iter().map(|s| ctx.iter().chain(s).copied().collect()).collect();
        let (ts, tt) = (s_rows[0].len(), t_rows[0].len());
        let mut targets = Targets::default();
        for (r, g) in gens.iter().enumerate() {
            for (i, &tok) in g.token_ids.iter().enumerate() {
                targets.student_rows.push(r * ts + plen + i - 1);
                targets.teacher_rows.push(r * tt + ctx.len() + plen + i - 1);
                targets.tokens.push(tok);
            }
        }
        let ht = teacher.forward_hidden(ids::<B::InnerBackend>(&t_rows, device), &Positions::causal(b, tt), None);
        let t_teacher = t1.elapsed().as_secs_f64();
        let hs = student.forward_trunk(ids::<B>(&s_rows, device), &Positions::causal(b, ts), recompute);
        let t_student = t1.elapsed().as_secs_f64();
        let out = backward_chunked(&div, &student, hs, &teacher, ht, &targets, targets.len(), 256);
        let t_backward = t1.elapsed().as_secs_f64();
        student = optim.step(1e-5, student, out.grads);
        let t_train = t1.elapsed().as_secs_f64();
        let c_train = cpu_seconds() - c1;
        if round == 1 {
            let tokens = (b * new) as f64;
            println!(
                "{{\"impl\":\"opsa\",\"backend\":\"{name}\",\"batch\":{b},\"prompt\":{plen},\"new\":{new},\"recompute\":{recompute},\"rollout_tok_s\":{:.1},\"train_tok_s\":{:.1},\"step_s\":{:.3},\"rollout_cores\":{:.2},\"train_cores\":{:.2},\"phases_s\":{{\"teacher_forward\":{:.3},\"student_forward\":{:.3},\"loss_backward\":{:.3},\"optimizer\":{:.3}}}}}",
                tokens / t_roll,
                tokens / t_train,
                t_roll + t_train,
                c_roll / t_roll,
                c_train / t_train,
                t_teacher,
                t_student - t_teacher,
                t_backward - t_student,
                t_train - t_backward
            );
        }
    }
    // Peak memory of the full-vocabulary divergence vs response length, at chunk 64.
    let full = Divergence { kind: DivergenceKind::Mixed { alpha: 0.5 }, top_k: None, ..Default::default() };
    for (len, chunk) in [(128usize, 64usize), (512, 64), (512, 512)] {
        let rows: Vec<Vec<u32>> = (0..b).map(|r| (0..len).map(|j| ((r * 13 + j * 7) % cfg.vocab_size) as u32).collect()).collect();
        let mut targets = Targets::default();
        for r in 0..b {
            for p in 1..len {
                targets.student_rows.push(r * len + p - 1);
                targets.teacher_rows.push(r * len + p - 1);
                targets.tokens.push(rows[r][p]);
            }
        }
        let ht = teacher.forward_hidden(ids::<B::InnerBackend>(&rows, device), &Positions::causal(b, len), None);
        let hs = student.forward_trunk(ids::<B>(&rows, device), &Positions::causal(b, len), false);
        let base = rss() as f64 / MIB;
        reset_peak();
        let out = backward_chunked(&full, &student, hs, &teacher, ht, &targets, targets.len(), chunk);
        drop(out);
        let logits_mib = (b * len * cfg.vocab_size * 4) as f64 / (1024.0 * 1024.0);
        println!(
            "{{\"impl\":\"opsa\",\"backend\":\"{name}\",\"divergence_peak\":true,\"response_len\":{len},\"chunk\":{chunk},\"peak_over_start_mib\":{:.0},\"one_full_logits_tensor_mib\":{logits_mib:.0}}}",
            peak_rss() as f64 / MIB - base
        );
    }
}

fn main() {
    common::configure_allocator();
    #[cfg(feature = "ndarray")]
    if want("ndarray") {
        step::<Autodiff<burn::backend::NdArray>>("ndarray", &Default::default());
    }
    #[cfg(feature = "flex")]
    if want("flex") {
        step::<Autodiff<burn::backend::Flex>>("flex", &Default::default());
    }
}
