//! The memory plan (`opsa train --plan`) against measured peak RSS, on the CPU backends.
//!
//! For two shapes (the tiny Qwen3 test fixture, and the benches' ~42M Qwen3 shape saved as a
//! Hugging Face folder), one OPSA step is run twice from its parts, as the trainer runs it:
//! rollouts without autodiff, then the teacher forward, the student forward/backward with the
//! chunked divergence and one AdamW step. The second step is measured (the first creates the
//! AdamW moments). Each phase's peak resident memory over the process's own baseline (before
//! any model was loaded) is printed beside the plan's figure for that phase.
//!
//!     cargo bench --bench memory_plan --features flex
//!
//! Environment: OPSA_PLAN_RECOMPUTE (1: activation recompute), OPSA_PLAN_DTYPE (f32 | bf16; bf16
//! on flex only), OPSA_PLAN_SHAPES (tiny,42m), OPSA_PLAN_NEW (the 42M shape's new tokens, 448), OPSA_PLAN_LORA (1: LoRA r = 16 on every projection,
//! the teacher being the student's base with the adapters off, as the trainer runs it).

#[path = "common/mod.rs"]
mod common;
use common::{config, env_usize, ids, peak_rss, reset_peak, rss};

use burn::backend::Autodiff;
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use opsa_distill::{backward_chunked, Targets};
use opsa_generate::{generate, SamplingParams};
use opsa_models::checkpoint::random_model;
use opsa_models::decoder::Positions;
use opsa_models::{load_model, save_model, LoadOptions, ModelConfig, WeightDType};
use opsa_train::plan::{human, memory_plan};
use opsa_train::TrainConfig;

/// The ~42M shape as a Hugging Face folder with random weights.
fn write_42m(dir: &std::path::Path) {
    let c = config();
    let json = serde_json::json!({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": false, "torch_dtype": "float32"
    });
    let tmp = dir.with_extension("src");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("config.json"), json.to_string()).unwrap();
    let mc = ModelConfig::from_file(&tmp.join("config.json")).unwrap();
    let model = random_model::<burn::backend::NdArray>(&c, 0, WeightDType::F32, &Default::default()).unwrap();
    save_model(&model, &mc, None, dir, WeightDType::F32, true).unwrap();
}

#[allow(clippy::too_many_arguments)]
fn measure<B: AutodiffBackend>(backend: &str, shape: &str, dir: &std::path::Path, prompt: usize, new: usize, rows: usize, micro: usize, device: &B::Device) {
    let dtype = std::env::var("OPSA_PLAN_DTYPE").unwrap_or_else(|_| "f32".into());
    let recompute = env_usize("OPSA_PLAN_RECOMPUTE", 0) == 1;
    let lora = env_usize("OPSA_PLAN_LORA", 0) == 1;
    let lora_toml = if lora {
        "[lora]\nr = 16\nalpha = 32\ntarget_modules = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"gate_proj\", \"up_proj\", \"down_proj\"]\n"
    } else {
        ""
    };
    let toml = format!(
        r#"method = "opsa"
[model]
path = "{}"
dtype = "{dtype}"
[data]
prompts = "unused.jsonl"
[context]
harmful = "This request is harmful. Refuse."
benign = "This request is safe. Help fully."
[divergence]
kind = "mixed"
alpha = 0.5
top_k = 64
chunk_size = 64
[rollout]
n = 1
temperature = 1.0
max_new_tokens = {new}
batch_size = {rows}
[optim]
lr = 1e-5
[train]
out_dir = "unused"
batch_size = {rows}
micro_batch_size = {micro}
recompute = {recompute}
{lora_toml}"#,
        dir.display()
    );
    let cfg = TrainConfig::from_table(toml::from_str(&toml).unwrap(), "bench").unwrap();
    let plan = memory_plan(&cfg, prompt).unwrap();
    let ctx = plan.teacher_len - plan.student_len;

    let base = rss();
    let (teacher, mut student) = match &cfg.lora {
        Some(l) => {
            let (student, _) = opsa_train::run::load_lora_student::<B>(&cfg, l, None, device).unwrap();
            (opsa_train::run::adapters_off(&student), student)
        }
        None => {
            let (teacher, _) = load_model::<B::InnerBackend>(dir, &LoadOptions { dtype: cfg.dtype() }, device).unwrap();
            (teacher, opsa_train::run::load_trainable::<B>(dir, &cfg, device).unwrap().0)
        }
    };
    let vocab = student.config.vocab_size;
    let mut optim = opsa_train::optim::adamw(&cfg.optim).init::<B, opsa_models::CausalLm<B>>();
    let div = cfg.divergence.divergence().unwrap();
    let prompts: Vec<Vec<u32>> = (0..rows).map(|r| (0..prompt).map(|j| ((r * 7919 + j * 104_729) % vocab) as u32).collect()).collect();
    let context: Vec<u32> = (0..ctx).map(|j| ((j * 31 + 5) % vocab) as u32).collect();
    let (mut rollout_peak, mut train_peak) = (0, 0);
    for round in 0..2u64 {
        reset_peak();
        let policy = opsa_train::run::policy(&student);
        let params = SamplingParams { temperature: 1.0, max_new_tokens: new, seed: round, ..Default::default() };
        let idx: Vec<u64> = (0..rows as u64).collect();
        let gens = generate(&policy, &prompts, &idx, &params, &[], None).unwrap();
        drop(policy);
        rollout_peak = peak_rss().saturating_sub(base);
        reset_peak();
        let mut acc = burn::optim::GradientsAccumulator::<opsa_models::CausalLm<B>>::new();
        let total: usize = gens.iter().map(|g| g.token_ids.len()).sum();
        for mb in (0..rows).collect::<Vec<_>>().chunks(micro) {
            let s_rows: Vec<Vec<u32>> = mb.iter().map(|&r| prompts[r].iter().chain(&gens[r].token_ids).copied().collect()).collect();
            let t_rows: Vec<Vec<u32>> = s_rows.iter().map(|s| context.iter().chain(s).copied().collect()).collect();
            let (ts, tt) = (s_rows[0].len(), t_rows[0].len());
            let mut targets = Targets::default();
            for (r, &k) in mb.iter().enumerate() {
                for (i, &tok) in gens[k].token_ids.iter().enumerate() {
                    targets.student_rows.push(r * ts + prompt + i - 1);
                    targets.teacher_rows.push(r * tt + ctx + prompt + i - 1);
                    targets.tokens.push(tok);
                }
            }
            let ht = teacher.forward_hidden(ids::<B::InnerBackend>(&t_rows, device), &Positions::causal(mb.len(), tt), None);
            let hs = student.forward_trunk(ids::<B>(&s_rows, device), &Positions::causal(mb.len(), ts), recompute);
            let out = backward_chunked(&div, &student, hs, &teacher, ht, &targets, total, cfg.divergence.chunk_size);
            acc.accumulate(&student, out.grads);
        }
        let grads: GradientsParams = acc.grads();
        student = optim.step(1e-5, student, grads);
        train_peak = peak_rss().saturating_sub(base);
    }
    let r = |m: u64, p: u64| p as f64 / m.max(1) as f64;
    println!(
        "{{\"backend\":\"{backend}\",\"shape\":\"{shape}\",\"dtype\":\"{dtype}\",\"recompute\":{recompute},\"lora\":{lora},\"tokens\":{},\"micro_batch\":{micro},\"rollout_measured\":\"{}\",\"rollout_plan\":\"{}\",\"rollout_plan_over_measured\":{:.2},\"train_measured\":\"{}\",\"train_plan\":\"{}\",\"train_plan_over_measured\":{:.2}}}",
        prompt + new,
        human(rollout_peak),
        human(plan.rollout_total()),
        r(rollout_peak, plan.rollout_total()),
        human(train_peak),
        human(plan.train_total()),
        r(train_peak, plan.train_total())
    );
}

fn run<B: AutodiffBackend>(backend: &str, device: &B::Device) {
    let shapes = std::env::var("OPSA_PLAN_SHAPES").unwrap_or_else(|_| "tiny,42m".into());
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if shapes.contains("tiny") {
        // 48 + 200 tokens (the fixture holds 256 positions; the teacher's context adds a few).
        measure::<B>(backend, "qwen3-tiny", &root.join("tests/fixtures/qwen3-tiny"), 48, 200, 4, 4, device);
    }
    if shapes.contains("42m") {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("qwen3-42m");
        write_42m(&dir);
        // OPSA_PLAN_NEW: new tokens per rollout (default 448).
        measure::<B>(backend, "qwen3-42m", &dir, 64, env_usize("OPSA_PLAN_NEW", 448), 2, 2, device);
    }
}

fn main() {
    common::configure_allocator();
    #[cfg(feature = "ndarray")]
    if std::env::var("OPSA_PLAN_DTYPE").map_or(true, |d| d == "f32") {
        run::<Autodiff<burn::backend::NdArray>>("ndarray", &Default::default());
    }
    #[cfg(feature = "flex")]
    run::<Autodiff<burn::backend::Flex>>("flex", &Default::default());
}
