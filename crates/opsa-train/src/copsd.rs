//! COPSD, constitutional on-policy safe distillation, top to bottom:
//!
//! 0. (optional) Cross-SFT cold start: a copy of the model, with the constitution in context,
//!    is fine-tuned on the model's own answers to benign prompts (no constitution) and on its
//!    constitution-guided answers to harmful prompts; it becomes the frozen teacher;
//! 1. per step, `train.batch_size` prompts, G = `rollout.n` student rollouts each;
//! 2. teacher (constitution of the prompt's category in context) and student score the sampled
//!    tokens: r_t = clip(log p_T(y_t) − log p_S(y_t), lo, hi) + bonus;
//! 3. advantages normalised over all valid tokens of a prompt's G rollouts,
//!    A = (r − mean) / (std + 1e-6) (population std);
//! 4. PPO-clipped policy gradient, token mean over the step, `copsd.ppo_epochs` updates;
//! 5. entropy and mean response length logged every step, with a warning when either falls
//!    below `copsd.*_warn_ratio` of its first-step value (the collapse signals).

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::backend::AutodiffBackend;
use opsa_distill::{backward_objective, token_logprobs, Contexts, Label, Objective, Pair, Targets};
use opsa_eval::refusal::{classify, Verdict};
use opsa_generate::{FinishReason, Generation};
use opsa_models::decoder::Positions;
use opsa_models::{load_model, save_model, CausalLm, HfTokenizer, LoadOptions};
use serde::Serialize;

use crate::config::{step_seed, TrainConfig};
use crate::data::{check_rollouts_fit, end_of_turn, read_prompts, step_batch, Constitution, Tokenized};
use crate::optim::adamw;
use crate::run::{check_fresh, generate_all, mean, padded, Next, Run, RunControl, StepSum};
use crate::sft::examples_backward;
use crate::TrainError;

/// One line of `metrics.jsonl` for COPSD.
#[derive(Debug, Clone, Serialize)]
pub struct CopsdMetrics {
    pub step: usize,
    /// The PPO loss of the step's first update.
    pub loss: f64,
    /// Mean clipped reward with bonus, and mean raw log-ratio log p_T − log p_S.
    pub reward: f64,
    pub log_ratio: f64,
    /// Share of tokens whose reward hit the lower / upper clip.
    pub reward_clipped_low: f64,
    pub reward_clipped_high: f64,
    /// Share of tokens whose ratio left [1−ε, 1+ε] in the last update (0 when ppo_epochs = 1).
    pub ratio_clipped: f64,
    /// The collapse signals: student entropy (nats) at response positions, mean response length.
    pub entropy: f64,
    pub response_len: f64,
    pub refusal_rate_harmful: Option<f64>,
    pub refusal_rate_benign: Option<f64>,
    pub truncated_rate: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub collapse_warning: Option<String>,
    pub rollout_tokens_per_s: f64,
    pub step_time_s: f64,
    pub wall_time_s: f64,
}

/// r_t = clip(log p_T − log p_S, lo, hi) + bonus, per token.
pub fn token_rewards(teacher_lp: &[f32], student_lp: &[f32], clip: [f64; 2], bonus: f64) -> Vec<f32> {
    teacher_lp.iter().zip(student_lp).map(|(&t, &s)| ((t - s) as f64).clamp(clip[0], clip[1]) as f32 + bonus as f32).collect()
}

/// Advantages normalised over all tokens of each group: `rewards[k]` are rollout k's per-token
/// rewards and `group[k]` its group (its prompt). A = (r − mean_g) / (std_g + 1e-6), with the
/// population standard deviation over the group's tokens.
pub fn group_advantages(rewards: &[Vec<f32>], group: &[usize]) -> Vec<Vec<f32>> {
    let groups = group.iter().copied().max().map_or(0, |g| g + 1);
    let (mut sum, mut sq, mut count) = (vec![0f64; groups], vec![0f64; groups], vec![0usize; groups]);
    for (r, &g) in rewards.iter().zip(group) {
        for &x in r {
            sum[g] += x as f64;
            sq[g] += (x as f64) * (x as f64);
            count[g] += 1;
        }
    }
    rewards
        .iter()
        .zip(group)
        .map(|(r, &g)| {
            let n = count[g].max(1) as f64;
            let m = sum[g] / n;
            let std = (sq[g] / n - m * m).max(0.0).sqrt();
            r.iter().map(|&x| ((x as f64 - m) / (std + 1e-6)) as f32).collect()
        })
        .collect()
}

/// Train with COPSD. Output layout as for every method; with a cold start, also `teacher/`
/// (the cold-started teacher, a Hugging Face folder reused on resume) and
/// `teacher-cold-start.jsonl`.
pub fn train_copsd<B: AutodiffBackend>(cfg: &TrainConfig, resume: bool, control: &RunControl, device: &B::Device) -> Result<PathBuf, TrainError> {
    // ---- 0. Everything that can be wrong is checked before any training work. ----
    check_fresh(cfg, resume)?;
    let prompts_path = cfg.data.prompts.as_ref().expect("validated");
    let prompts = read_prompts(prompts_path)?;
    let constitution = Constitution::read(cfg.copsd.constitution.as_ref().expect("validated"))?;
    constitution.check(&prompts, prompts_path)?;
    let model_dir = &cfg.model.path;
    let tok = HfTokenizer::from_dir(model_dir)?;
    let vars = cfg.chat_vars();
    let pairs: Vec<Pair> = prompts
        .iter()
        .map(|p| {
            let text = constitution.text(p.category()).to_string();
            let ctx = Contexts { harmful: text.clone(), benign: text, placement: cfg.context.placement, separator: cfg.context.separator.clone() };
            Pair::new(&tok, &vars, &ctx, &p.prompt, p.label).map_err(TrainError::Config)
        })
        .collect::<Result<_, _>>()?;
    let dtype = cfg.dtype();
    let (initial, model_config) = load_model::<B::InnerBackend>(model_dir, &LoadOptions { dtype }, device)?;
    tok.check_vocab(initial.config.vocab_size)?;
    let max_pos = initial.config.max_position_embeddings;
    check_rollouts_fit(&pairs, cfg.rollout.max_new_tokens, max_pos, prompts_path, "constitution text")?;
    let rollouts_of = |model: &CausalLm<B::InnerBackend>, prompts_ids: Vec<Vec<u32>>, seed: u64| {
        generate_all(model, &prompts_ids, cfg.rollout.batch_size, &cfg.rollout.params(seed), &tok)
    };

    // ---- 0b. The teacher: the initial weights, or their Cross-SFT cold start. ----
    let teacher_dir = cfg.train.out_dir.join("teacher");
    let teacher = if cfg.copsd.cold_start_epochs == 0 {
        // With LoRA the teacher is the student's base with the adapters off (taken below).
        cfg.lora.is_none().then_some(initial)
    } else if resume && teacher_dir.join("config.json").exists() {
        Some(load_model::<B::InnerBackend>(&teacher_dir, &LoadOptions { dtype }, device)?.0)
    } else {
        let eot = end_of_turn(&tok, &vars)?;
        // Benign: the model's own answers without the constitution; harmful: its answers with it.
        let own = rollouts_of(&initial, pairs.iter().map(|p| p.student_prompt.clone()).collect(), cfg.train.seed ^ 0xC01D)?;
        let guided = rollouts_of(&initial, pairs.iter().map(|p| p.teacher_prompt.clone()).collect(), cfg.train.seed ^ 0xC01E)?;
        let mut data: Vec<Tokenized> = vec![];
        for (i, p) in prompts.iter().enumerate() {
            let g = if p.label == Label::Benign { &own[i] } else { &guided[i] };
            if g.finish_reason == FinishReason::Stop && classify(&g.text) != Verdict::Truncated {
                let mut resp = g.token_ids.clone();
                if resp.last().is_some_and(|t| tok.eos_ids().contains(t)) {
                    resp.pop();
                }
                resp.extend_from_slice(&eot);
                data.push(Tokenized { prompt: pairs[i].teacher_prompt.clone(), response: resp, label: None });
            }
        }
        if data.is_empty() {
            return Err(TrainError::Data("COPSD cold start: every answer was truncated; raise rollout.max_new_tokens".into()));
        }
        drop(initial);
        let trained = cold_start::<B>(cfg, &data, control, device)?;
        save_model(&trained, &model_config, Some(model_dir), &teacher_dir, dtype, true)?;
        Some(trained)
    };

    let (n, batch, g) = (prompts.len(), cfg.train.batch_size, cfg.rollout.n);
    let total = cfg.total_steps(n);
    let (mut run, mut student, mut optim) = Run::open::<B>(cfg, resume, total, control, device)?;
    let teacher = teacher.unwrap_or_else(|| crate::run::adapters_off(&student));
    if student.config.vocab_size != teacher.config.vocab_size {
        return Err(TrainError::Config("student and teacher vocabularies differ".into()));
    }
    let chunk = cfg.divergence.chunk_size;

    for step in run.state.step..total {
        let t0 = Instant::now();
        // ---- 1. This step's prompts, G rollouts each; rollout k belongs to group k / G. ----
        let batch_prompts = step_batch(n, batch, step, cfg.train.seed, cfg.data.shuffle);
        let jobs: Vec<usize> = batch_prompts.iter().flat_map(|&i| std::iter::repeat(i).take(g)).collect();
        let group: Vec<usize> = (0..jobs.len()).map(|k| k / g).collect();
        let policy = crate::run::policy(&student);
        let seed = step_seed(cfg.train.seed, step);
        let rollouts = rollouts_of(&policy, jobs.iter().map(|&i| pairs[i].student_prompt.clone()).collect(), seed)?;
        let t_rollout = t0.elapsed().as_secs_f64();
        let step_tokens: usize = rollouts.iter().map(|r| r.token_ids.len()).sum();

        // ---- 2. Sampled-token rewards from the teacher's and the (old) student's scores. ----
        let (mut rewards, mut old_lp, mut entropy, mut log_ratio) = (vec![], vec![], vec![], vec![]);
        let ks: Vec<usize> = (0..jobs.len()).collect();
        for mb in ks.chunks(cfg.train.micro_batch_size) {
            let (s_seqs, t_seqs, s_t, t_t) = streams(&pairs, &jobs, &rollouts, mb);
            let targets = targets_of(&pairs, &jobs, &rollouts, mb, s_t, t_t);
            let (s_ids, _) = padded::<B::InnerBackend>(&s_seqs, device);
            let (t_ids, _) = padded::<B::InnerBackend>(&t_seqs, device);
            let hs = policy.forward_hidden(s_ids, &Positions::causal(mb.len(), s_t), None);
            let ht = teacher.forward_hidden(t_ids, &Positions::causal(mb.len(), t_t), None);
            let (lp_s, ent) = token_logprobs(&policy, hs, &targets.student_rows, &targets.tokens, chunk);
            let (lp_t, _) = token_logprobs(&teacher, ht, &targets.teacher_rows, &targets.tokens, chunk);
            let r = token_rewards(&lp_t, &lp_s, cfg.copsd.reward_clip, cfg.copsd.bonus);
            log_ratio.extend(lp_t.iter().zip(&lp_s).map(|(t, s)| (t - s) as f64));
            entropy.extend(ent.iter().map(|&x| x as f64));
            let mut at = 0;
            for &k in mb {
                let len = rollouts[k].token_ids.len();
                rewards.push(r[at..at + len].to_vec());
                old_lp.push(lp_s[at..at + len].to_vec());
                at += len;
            }
        }
        drop(policy);
        // ---- 3. Advantages, normalised within each prompt's group. ----
        let advantages = group_advantages(&rewards, &group);

        // ---- 4. PPO-clipped policy gradient, `ppo_epochs` updates on these rollouts. ----
        let lr = run.lr(step);
        let (mut first_loss, mut grad_norm, mut ratio_clipped) = (None, 0.0, 0.0);
        for _ in 0..cfg.copsd.ppo_epochs {
            let mut sum = StepSum::<B>::default();
            for mb in ks.chunks(cfg.train.micro_batch_size) {
                let (s_seqs, _, s_t, t_t) = streams(&pairs, &jobs, &rollouts, mb);
                let targets = targets_of(&pairs, &jobs, &rollouts, mb, s_t, t_t);
                let adv: Vec<f32> = mb.iter().flat_map(|&k| advantages[k].iter().copied()).collect();
                let old: Vec<f32> = mb.iter().flat_map(|&k| old_lp[k].iter().copied()).collect();
                let (s_ids, _) = padded::<B>(&s_seqs, device);
                let hs = student.forward_trunk(s_ids, &Positions::causal(mb.len(), s_t), cfg.train.recompute);
                let obj = Objective::Ppo { advantages: &adv, old_logprobs: &old, clip: cfg.copsd.ppo_clip };
                sum.add(&student, backward_objective(&obj, &student, hs, None, &targets, step_tokens, chunk));
            }
            (student, _, grad_norm) = run.update(student, &mut optim, &mut sum, step)?;
            first_loss.get_or_insert(sum.loss);
            // The values are the ratios ρ (f32 widened: compared as f32, as they were computed).
            let eps = cfg.copsd.ppo_clip as f32;
            let ratios = &sum.values;
            ratio_clipped = ratios.iter().filter(|&&r| (r as f32 - 1.0).abs() > eps).count() as f64 / ratios.len().max(1) as f64;
        }

        // ---- 5. Metrics and the collapse signals. ----
        let ent = mean(&entropy).unwrap_or(0.0);
        let len = step_tokens as f64 / rollouts.len() as f64;
        let start_ent = *run.state.start_entropy.get_or_insert(ent);
        let start_len = *run.state.start_response_len.get_or_insert(len);
        let mut warnings = vec![];
        if ent < cfg.copsd.entropy_warn_ratio * start_ent {
            warnings.push(format!("entropy {ent:.3} fell below {} × its start value {start_ent:.3}", cfg.copsd.entropy_warn_ratio));
        }
        if len < cfg.copsd.length_warn_ratio * start_len {
            warnings.push(format!("mean response length {len:.1} fell below {} × its start value {start_len:.1}", cfg.copsd.length_warn_ratio));
        }
        let collapse_warning = (!warnings.is_empty()).then(|| format!("possible collapse at step {}: {}", step + 1, warnings.join("; ")));
        if let Some(w) = &collapse_warning {
            run.warn(w);
        }
        let all_r: Vec<f64> = rewards.iter().flatten().map(|&x| x as f64).collect();
        let lo = cfg.copsd.reward_clip[0];
        let hi = cfg.copsd.reward_clip[1];
        let share = |f: &dyn Fn(f64) -> bool| log_ratio.iter().filter(|&&x| f(x)).count() as f64 / log_ratio.len().max(1) as f64;
        let rate = |l: Label| {
            let v: Vec<f64> = jobs
                .iter()
                .zip(&rollouts)
                .filter(|(&i, _)| prompts[i].label == l)
                .map(|(_, r)| (classify(&r.text) == Verdict::Refusal) as u8 as f64)
                .collect();
            mean(&v)
        };
        let step_time = t0.elapsed().as_secs_f64();
        let m = CopsdMetrics {
            step: step + 1,
            loss: first_loss.unwrap_or(0.0),
            reward: mean(&all_r).unwrap_or(0.0),
            log_ratio: mean(&log_ratio).unwrap_or(0.0),
            reward_clipped_low: share(&|x| x < lo),
            reward_clipped_high: share(&|x| x > hi),
            ratio_clipped,
            entropy: ent,
            response_len: len,
            refusal_rate_harmful: rate(Label::Harmful),
            refusal_rate_benign: rate(Label::Benign),
            truncated_rate: rollouts.iter().filter(|r| classify(&r.text) == Verdict::Truncated).count() as f64 / rollouts.len() as f64,
            lr,
            grad_norm,
            collapse_warning,
            rollout_tokens_per_s: step_tokens as f64 / t_rollout.max(1e-9),
            step_time_s: step_time,
            wall_time_s: run.wall_time(),
        };
        let msg = format!("reward {:.3} entropy {:.3} len {:.1}", m.reward, m.entropy, m.response_len);
        run.log(&m, msg)?;
        if run.end_step(step_tokens, &student, &optim, control)? == Next::Stop {
            return Ok(run.dir);
        }
    }
    run.finish(&student)
}

/// Student and teacher sequences of micro-batch `mb`, with their padded lengths.
fn streams(pairs: &[Pair], jobs: &[usize], rollouts: &[Generation], mb: &[usize]) -> (Vec<Vec<u32>>, Vec<Vec<u32>>, usize, usize) {
    let (mut s, mut t) = (vec![], vec![]);
    for &k in mb {
        let (a, b) = pairs[jobs[k]].join(&rollouts[k].token_ids);
        s.push(a);
        t.push(b);
    }
    let ts = s.iter().map(Vec::len).max().unwrap_or(1);
    let tt = t.iter().map(Vec::len).max().unwrap_or(1);
    (s, t, ts, tt)
}

/// Response-token targets of micro-batch `mb`.
fn targets_of(pairs: &[Pair], jobs: &[usize], rollouts: &[Generation], mb: &[usize], ts: usize, tt: usize) -> Targets {
    let mut targets = Targets::default();
    for (r, &k) in mb.iter().enumerate() {
        let p = &pairs[jobs[k]];
        targets.push_response(r * ts + p.student_prompt.len(), r * tt + p.teacher_prompt.len(), &rollouts[k].token_ids);
    }
    targets
}

/// Cross-SFT cold start: prompt-masked cross-entropy on `(teacher prompt, response)` examples
/// (the SFT step, [`examples_backward`], without packing) for `copsd.cold_start_epochs` epochs
/// at a constant `copsd.cold_start_lr`. Logs to `teacher-cold-start.jsonl`. Returns the trained
/// model, frozen.
fn cold_start<B: AutodiffBackend>(cfg: &TrainConfig, data: &[Tokenized], control: &RunControl, device: &B::Device) -> Result<CausalLm<B::InnerBackend>, TrainError> {
    let (mut model, _) = crate::run::load_trainable::<B>(&cfg.model.path, cfg, device)?;
    let mut optim = adamw(&cfg.optim).init::<B, CausalLm<B>>();
    let (n, batch) = (data.len(), cfg.train.batch_size);
    let steps = cfg.copsd.cold_start_epochs * n.div_ceil(batch);
    crate::run::start_run(cfg, false)?;
    let log_path = cfg.train.out_dir.join("teacher-cold-start.jsonl");
    let mut log = String::new();
    let bar = indicatif::ProgressBar::new(steps as u64)
        .with_style(indicatif::ProgressStyle::with_template("teacher cold start {bar:30} {pos}/{len} {msg}").expect("template"));
    if !control.progress {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    for step in 0..steps {
        let idx = step_batch(n, batch, step, cfg.train.seed, cfg.data.shuffle);
        let (mut sum, _) = examples_backward(cfg, &model, data, &idx, None, None, device);
        let grad_norm;
        (model, grad_norm) = sum
            .apply(model, &mut optim, cfg.copsd.cold_start_lr, cfg.optim.grad_clip, step, &cfg.train.out_dir)
            .map_err(|e| TrainError::NonFinite(format!("teacher cold start: {e}")))?;
        let loss = sum.loss;
        log.push_str(&format!("{}\n", serde_json::json!({ "step": step + 1, "loss": loss, "grad_norm": grad_norm })));
        bar.set_message(format!("loss {loss:.4}"));
        bar.inc(1);
    }
    bar.finish_and_clear();
    std::fs::write(&log_path, log).map_err(|e| crate::io(&log_path, e))?;
    Ok(crate::run::policy(&model))
}
