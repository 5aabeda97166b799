//! The OPSA loop, top to bottom: sample prompts → student rollouts → teacher (with context)
//! and student score the same tokens → divergence → backward → clip → AdamW → next step.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use opsa_distill::{backward_chunked, Contexts, Label, Pair, Targets};
use opsa_eval::refusal::{classify, Verdict};
use opsa_generate::{generate, Generation, SamplingParams};
use opsa_models::decoder::Positions;
use opsa_models::{load_model, save_model, CausalLm, HfTokenizer, LoadOptions};
use serde::Serialize;

use crate::checkpoint::{list_checkpoints, load_optimizer, read_state, save_checkpoint, TrainState};
use crate::config::TrainConfig;
use crate::data::{read_prompts, step_batch};
use crate::optim::{adamw, clip_global_grad_norm};
use crate::schedule::{cosine_with_warmup, warmup_steps};
use crate::TrainError;

/// How a run may be stopped early.
#[derive(Default)]
pub struct RunControl<'a> {
    /// Set by Ctrl-C: a checkpoint is saved at the end of the current step, then the run stops.
    pub interrupt: Option<&'a AtomicBool>,
    /// Stop (with a checkpoint) once this many steps are complete.
    pub stop_after: Option<usize>,
    /// Show a progress bar.
    pub progress: bool,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct StepMetrics {
    pub step: usize,
    /// The step's objective (token mean of the per-token loss over all its response tokens).
    pub loss: f64,
    /// Mean per-token divergence, overall and by response position.
    pub divergence: f64,
    pub divergence_pos_0_10: Option<f64>,
    pub divergence_pos_10_30: Option<f64>,
    pub divergence_pos_30_plus: Option<f64>,
    /// Student entropy (nats) at response positions.
    pub entropy: f64,
    pub response_len: f64,
    /// Share of rollouts the rule-based detector marks as refusals (all / harmful / benign).
    pub refusal_rate: f64,
    pub refusal_rate_harmful: Option<f64>,
    pub refusal_rate_benign: Option<f64>,
    /// Share of rollouts whose thinking never closed.
    pub truncated_rate: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub rollout_tokens_per_s: f64,
    pub train_tokens_per_s: f64,
    pub step_time_s: f64,
    pub wall_time_s: f64,
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn read_context(inline: &Option<String>, file: &Option<PathBuf>) -> Result<String, TrainError> {
    match (inline, file) {
        (Some(s), _) => Ok(s.clone()),
        (None, Some(p)) => {
            let s = std::fs::read_to_string(p).map_err(|e| TrainError::Config(format!("{}: {e}", p.display())))?;
            Ok(s.strip_suffix('\n').unwrap_or(&s).to_string())
        }
        (None, None) => unreachable!("validated"),
    }
}

/// Right-padded `[rows, longest]` ids (pad 0; causal attention never looks at later padding).
fn padded<B: Backend>(seqs: &[Vec<u32>], device: &B::Device) -> (Tensor<B, 2, Int>, usize) {
    let t = seqs.iter().map(Vec::len).max().unwrap_or(1);
    let mut ids = Vec::with_capacity(seqs.len() * t);
    for s in seqs {
        ids.extend(s.iter().map(|&x| x as i64).chain(std::iter::repeat(0).take(t - s.len())));
    }
    (Tensor::from_data(TensorData::new(ids, [seqs.len(), t]), device), t)
}

/// Train with OPSA. Writes `config.toml`, `metrics.jsonl`, `checkpoints/` and `final/` under
/// `cfg.train.out_dir`. With `resume`, continues from the newest checkpoint there.
pub fn train_opsa<B: AutodiffBackend>(cfg: &TrainConfig, resume: bool, control: &RunControl, device: &B::Device) -> Result<PathBuf, TrainError> {
    // ---- 0. Everything that can be wrong is checked before any training work. ----
    let run = cfg.train.out_dir.clone();
    let prompts = read_prompts(&cfg.data.prompts)?;
    let model_dir = &cfg.model.path;
    let tok = HfTokenizer::from_dir(model_dir)?;
    let vars = cfg.chat_vars();
    let contexts = Contexts {
        harmful: read_context(&cfg.context.harmful, &cfg.context.harmful_file)?,
        benign: read_context(&cfg.context.benign, &cfg.context.benign_file)?,
        placement: cfg.context.placement,
        separator: cfg.context.separator.clone(),
    };
    for (what, c) in [("harmful", &contexts.harmful), ("benign", &contexts.benign)] {
        if tok.encode(c, false)?.is_empty() {
            return Err(TrainError::Config(format!("context.{what} tokenises to no tokens")));
        }
    }
    let divergence = cfg.divergence.divergence()?;
    let dtype = cfg.dtype();
    // The teacher: the initial weights, frozen, without autodiff.
    let (teacher, model_config) = load_model::<B::InnerBackend>(model_dir, &LoadOptions { dtype }, device)?;
    tok.check_vocab(teacher.config.vocab_size)?;
    let pairs: Vec<Pair> = prompts
        .iter()
        .map(|p| Pair::render(&tok, &tok, &vars, &contexts, &p.prompt, p.label).map_err(TrainError::Config))
        .collect::<Result<_, _>>()?;
    let max_pos = teacher.config.max_position_embeddings;
    if let Some((i, p)) = pairs.iter().enumerate().find(|(_, p)| p.teacher_prompt.len() + cfg.rollout.max_new_tokens > max_pos) {
        return Err(TrainError::Data(format!(
            "{}: prompt {} with its context ({} tokens) plus rollout.max_new_tokens ({}) exceeds max_position_embeddings ({max_pos})",
            cfg.data.prompts.display(),
            i + 1,
            p.teacher_prompt.len(),
            cfg.rollout.max_new_tokens
        )));
    }
    let (n, batch) = (prompts.len(), cfg.train.batch_size);
    let total = cfg.train.steps.unwrap_or(cfg.train.epochs * n.div_ceil(batch));
    let warmup = warmup_steps(total, cfg.schedule.warmup_ratio);

    // ---- Student, optimiser and state: fresh, or from the newest checkpoint. ----
    let mut optim = adamw(&cfg.optim).init::<B, CausalLm<B>>();
    let (mut student, mut state) = if resume {
        let (_, ckpt) = list_checkpoints(&run)
            .pop()
            .ok_or_else(|| TrainError::Io(format!("{}: no checkpoint to resume from", run.display())))?;
        let state = read_state(&ckpt)?;
        let (student, _) = load_model::<B>(&ckpt.join("model"), &LoadOptions { dtype }, device)?;
        optim = load_optimizer(&ckpt, optim, device)?;
        tracing::info!("resuming {} at step {}", run.display(), state.step);
        (student, state)
    } else {
        if run.join("metrics.jsonl").exists() || run.join("checkpoints").exists() {
            return Err(TrainError::Io(format!(
                "{}: already holds a run (use --resume to continue it, or another train.out_dir)",
                run.display()
            )));
        }
        let (student, _) = load_model::<B>(model_dir, &LoadOptions { dtype }, device)?;
        (student, TrainState { total_steps: total, seed: cfg.train.seed, ..Default::default() })
    };
    if student.config.vocab_size != teacher.config.vocab_size {
        return Err(TrainError::Config(format!(
            "student vocab_size {} differs from the teacher's {} ({}): the divergence needs one vocabulary",
            student.config.vocab_size,
            teacher.config.vocab_size,
            model_dir.display()
        )));
    }
    std::fs::create_dir_all(&run).map_err(|e| TrainError::Io(format!("{}: {e}", run.display())))?;
    std::fs::write(run.join("config.toml"), cfg.to_toml()).map_err(|e| TrainError::Io(format!("{}: {e}", run.display())))?;
    let metrics_path = run.join("metrics.jsonl");
    truncate_metrics(&metrics_path, state.step)?;
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| TrainError::Io(format!("{}: {e}", metrics_path.display())))?;

    let bar = indicatif::ProgressBar::new(total as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:30} step {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}").expect("template"),
    );
    if !control.progress {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_position(state.step as u64);
    let sampling = |step: usize| SamplingParams {
        temperature: cfg.rollout.temperature,
        top_k: cfg.rollout.top_k,
        top_p: cfg.rollout.top_p,
        max_new_tokens: cfg.rollout.max_new_tokens,
        seed: cfg.train.seed ^ (step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        stop_strings: vec![],
    };
    let run_start = Instant::now() - std::time::Duration::from_secs_f64(state.wall_time_s);

    for step in state.step..total {
        let t0 = Instant::now();
        // ---- 1. This step's prompts, each `rollout.n` times. ----
        let jobs: Vec<usize> = step_batch(n, batch, step, cfg.train.seed, cfg.data.shuffle)
            .into_iter()
            .flat_map(|i| std::iter::repeat(i).take(cfg.rollout.n))
            .collect();

        // ---- 2. Student rollouts, without autodiff. ----
        let policy = student.valid();
        let params = sampling(step);
        let mut rollouts: Vec<Generation> = Vec::with_capacity(jobs.len());
        for (c, chunk) in jobs.chunks(cfg.rollout.batch_size).enumerate() {
            let ids: Vec<Vec<u32>> = chunk.iter().map(|&i| pairs[i].student_prompt.clone()).collect();
            let index: Vec<u64> = (0..chunk.len()).map(|k| (c * cfg.rollout.batch_size + k) as u64).collect();
            rollouts.extend(generate(&policy, &ids, &index, &params, tok.eos_ids(), Some(&tok))?);
        }
        drop(policy);
        let t_rollout = t0.elapsed().as_secs_f64();
        // The objective is the token mean over the whole step, whatever the micro-batching.
        let step_tokens: usize = rollouts.iter().map(|g| g.token_ids.len()).sum();

        // ---- 3. Teacher and student score the same response tokens; backward per micro-batch. ----
        let mut acc = GradientsAccumulator::<CausalLm<B>>::new();
        let (mut loss, mut by_pos, mut values, mut entropy) = (0.0, [vec![], vec![], vec![]], vec![], vec![]);
        for mb in (0..jobs.len()).collect::<Vec<_>>().chunks(cfg.train.micro_batch_size) {
            let (mut s_seqs, mut t_seqs, mut spans) = (vec![], vec![], vec![]);
            for &k in mb {
                let pair = &pairs[jobs[k]];
                let (s, t) = pair.join(&rollouts[k].token_ids);
                spans.push((pair.student_prompt.len(), pair.teacher_prompt.len(), rollouts[k].token_ids.clone()));
                s_seqs.push(s);
                t_seqs.push(t);
            }
            let (s_ids, ts) = padded::<B>(&s_seqs, device);
            let (t_ids, tt) = padded::<B::InnerBackend>(&t_seqs, device);
            // Position p−1 predicts token p: response token i sits at prompt_len + i.
            let mut targets = Targets::default();
            for (r, (ps, pt, resp)) in spans.iter().enumerate() {
                for (i, &tok_id) in resp.iter().enumerate() {
                    targets.student_rows.push(r * ts + ps + i - 1);
                    targets.teacher_rows.push(r * tt + pt + i - 1);
                    targets.tokens.push(tok_id);
                }
            }
            let m = mb.len();
            let ht = teacher.forward_hidden(t_ids, &Positions::causal(m, tt), None);
            let hs = student.forward_hidden(s_ids, &Positions::causal(m, ts), None);
            let out = backward_chunked(&divergence, &student, hs, &teacher, ht, &targets, step_tokens, cfg.divergence.chunk_size);
            loss += out.loss;
            let mut at = 0;
            for (_, _, resp) in &spans {
                for i in 0..resp.len() {
                    let v = out.values[at + i] as f64;
                    by_pos[if i < 10 { 0 } else if i < 30 { 1 } else { 2 }].push(v);
                }
                at += resp.len();
            }
            values.extend(out.values.iter().map(|&v| v as f64));
            entropy.extend(out.entropy.iter().map(|&v| v as f64));
            acc.accumulate(&student, out.grads);
        }
        let mut grads = acc.grads();

        // ---- 4. A NaN or infinite loss stops the run; the last checkpoint stays intact. ----
        if !loss.is_finite() {
            return Err(TrainError::NonFinite(format!("loss is {loss} at step {}; the last checkpoint in {} is intact", step + 1, run.display())));
        }
        // ---- 5. Global gradient-norm clip, schedule, AdamW. ----
        let grad_norm = clip_global_grad_norm::<B, _>(&student, &mut grads, cfg.optim.grad_clip);
        if !grad_norm.is_finite() {
            return Err(TrainError::NonFinite(format!("gradient norm is {grad_norm} at step {}", step + 1)));
        }
        let lr = cosine_with_warmup(step, total, cfg.optim.lr, warmup, cfg.schedule.min_lr_ratio);
        student = optim.step(lr, student, grads);

        // ---- 6. Metrics. ----
        let step_time = t0.elapsed().as_secs_f64();
        let verdicts: Vec<(Label, Verdict)> = jobs.iter().zip(&rollouts).map(|(&i, g)| (prompts[i].label, classify(&g.text))).collect();
        let rate = |want: Option<Label>| {
            let v: Vec<f64> = verdicts
                .iter()
                .filter(|(l, _)| want.is_none_or(|w| w == *l))
                .map(|(_, v)| (*v == Verdict::Refusal) as u8 as f64)
                .collect();
            mean(&v)
        };
        let m = StepMetrics {
            step: step + 1,
            loss,
            divergence: mean(&values).unwrap_or(0.0),
            divergence_pos_0_10: mean(&by_pos[0]),
            divergence_pos_10_30: mean(&by_pos[1]),
            divergence_pos_30_plus: mean(&by_pos[2]),
            entropy: mean(&entropy).unwrap_or(0.0),
            response_len: step_tokens as f64 / rollouts.len() as f64,
            refusal_rate: rate(None).unwrap_or(0.0),
            refusal_rate_harmful: rate(Some(Label::Harmful)),
            refusal_rate_benign: rate(Some(Label::Benign)),
            truncated_rate: verdicts.iter().filter(|(_, v)| *v == Verdict::Truncated).count() as f64 / verdicts.len() as f64,
            lr,
            grad_norm,
            rollout_tokens_per_s: step_tokens as f64 / t_rollout.max(1e-9),
            train_tokens_per_s: step_tokens as f64 / (step_time - t_rollout).max(1e-9),
            step_time_s: step_time,
            wall_time_s: run_start.elapsed().as_secs_f64(),
        };
        writeln!(metrics, "{}", serde_json::to_string(&m).expect("metrics serialise")).map_err(|e| TrainError::Io(e.to_string()))?;
        metrics.flush().map_err(|e| TrainError::Io(e.to_string()))?;
        tracing::info!(step = m.step, loss = m.loss, lr = m.lr, grad_norm = m.grad_norm, "step");
        bar.set_message(format!("loss {:.4} div {:.4}", m.loss, m.divergence));
        bar.inc(1);

        // ---- 7. Checkpoints, interruption. ----
        state.step = step + 1;
        state.prompts_seen = state.step * batch;
        state.tokens_trained += step_tokens;
        state.wall_time_s = m.wall_time_s;
        let interrupted = control.interrupt.is_some_and(|f| f.load(Ordering::SeqCst));
        let stop_here = control.stop_after == Some(state.step);
        let periodic = cfg.train.save_every > 0 && state.step % cfg.train.save_every == 0;
        if periodic || interrupted || stop_here || state.step == total {
            save_checkpoint(&run, &state, &student, &model_config, model_dir, dtype, &optim, cfg.train.keep_checkpoints)?;
        }
        if interrupted {
            bar.abandon();
            return Err(TrainError::Interrupted(format!(
                "stopped after step {}; checkpoint saved; continue with --resume {}",
                state.step,
                run.display()
            )));
        }
        if stop_here {
            bar.abandon();
            return Ok(run);
        }
    }
    bar.finish();

    // ---- The final model, as a Hugging Face folder. ----
    let final_dir = run.join("final");
    save_model(&student.valid(), &model_config, Some(model_dir), &final_dir, dtype, true)?;
    Ok(final_dir)
}

/// Mean per-token divergence between `teacher` (with context) and `student` on the student's
/// own rollouts of `pairs` (no autodiff): how far the student still is from the teacher.
pub fn mean_divergence<B: Backend>(
    student: &CausalLm<B>,
    teacher: &CausalLm<B>,
    tok: &HfTokenizer,
    pairs: &[Pair],
    params: &SamplingParams,
    divergence: &opsa_distill::Divergence,
) -> Result<f64, TrainError> {
    let prompts: Vec<Vec<u32>> = pairs.iter().map(|p| p.student_prompt.clone()).collect();
    let index: Vec<u64> = (0..pairs.len() as u64).collect();
    let rollouts = generate(student, &prompts, &index, params, tok.eos_ids(), Some(tok))?;
    let (mut total, mut count) = (0.0, 0usize);
    for (pair, g) in pairs.iter().zip(&rollouts) {
        let v = opsa_distill::response_divergence(divergence, student, teacher, pair, &g.token_ids);
        total += v.iter().map(|&x| x as f64).sum::<f64>();
        count += v.len();
    }
    Ok(total / count.max(1) as f64)
}

/// On resume, drop metric lines of steps after the checkpoint (they will be redone).
fn truncate_metrics(path: &Path, step: usize) -> Result<(), TrainError> {
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v.get("step").and_then(|s| s.as_u64())).is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(path, kept).map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))
}
