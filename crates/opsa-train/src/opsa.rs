//! The OPSA loop, top to bottom: sample prompts → student rollouts → teacher (with context)
//! and student score the same tokens → divergence → backward → clip → AdamW → next step.

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::backend::{AutodiffBackend, Backend};
use opsa_distill::{backward_chunked, Label, Pair, Targets};
use opsa_eval::refusal::{classify, Verdict};
use opsa_generate::{generate, Generation, SamplingParams};
use opsa_models::decoder::Positions;
use opsa_models::{load_model, CausalLm, HfTokenizer, LoadOptions};
use serde::Serialize;

use crate::config::{step_seed, TrainConfig};
use crate::data::{check_rollouts_fit, read_prompts, step_batch};
use crate::run::{adapters_off, check_fresh, generate_all, mean, padded, policy, Next, Run, RunControl, StepSum};
use crate::TrainError;

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

/// Train with OPSA. Writes `config.toml`, `metrics.jsonl`, `checkpoints/` and `final/` under
/// `cfg.train.out_dir`. With `resume`, continues from the newest checkpoint there.
pub fn train_opsa<B: AutodiffBackend>(cfg: &TrainConfig, resume: bool, control: &RunControl, device: &B::Device) -> Result<PathBuf, TrainError> {
    // ---- 0. Everything that can be wrong is checked before any training work. ----
    check_fresh(cfg, resume)?;
    let prompts_path = cfg.data.prompts.as_ref().expect("validated");
    let prompts = read_prompts(prompts_path)?;
    let model_dir = &cfg.model.path;
    let tok = HfTokenizer::from_dir(model_dir)?;
    let vars = cfg.chat_vars();
    let contexts = cfg.contexts()?;
    for (what, c) in [("harmful", &contexts.harmful), ("benign", &contexts.benign)] {
        if tok.encode(c, false)?.is_empty() {
            return Err(TrainError::Config(format!("context.{what} tokenises to no tokens")));
        }
    }
    let divergence = cfg.divergence.divergence()?;
    let dtype = cfg.dtype();
    // The teacher: the initial weights, frozen, without autodiff (with LoRA: the student's base
    // with the adapters off, taken once the student is loaded).
    let config_path = model_dir.join("config.json");
    let dcfg = opsa_models::ModelConfig::from_file(&config_path)?.decoder(&config_path)?;
    tok.check_vocab(dcfg.vocab_size)?;
    let teacher = match cfg.lora {
        None => Some(load_model::<B::InnerBackend>(model_dir, &LoadOptions { dtype }, device)?.0),
        Some(_) => None,
    };
    let pairs: Vec<Pair> = prompts
        .iter()
        .map(|p| Pair::new(&tok, &vars, &contexts, &p.prompt, p.label).map_err(TrainError::Config))
        .collect::<Result<_, _>>()?;
    let max_pos = dcfg.max_position_embeddings;
    check_rollouts_fit(&pairs, cfg.rollout.max_new_tokens, max_pos, prompts_path, "context")?;
    let (n, batch) = (prompts.len(), cfg.train.batch_size);
    let total = cfg.total_steps(n);

    // ---- Student, optimiser and state: fresh, or from the newest checkpoint. ----
    let (mut run, mut student, mut optim) = Run::open::<B>(cfg, resume, total, control, device)?;
    let teacher = teacher.unwrap_or_else(|| adapters_off(&student));
    if student.config.vocab_size != teacher.config.vocab_size {
        return Err(TrainError::Config(format!(
            "student vocab_size {} differs from the teacher's {} ({}): the divergence needs one vocabulary",
            student.config.vocab_size,
            teacher.config.vocab_size,
            model_dir.display()
        )));
    }

    for step in run.state.step..total {
        let t0 = Instant::now();
        // ---- 1. This step's prompts, each `rollout.n` times. ----
        let jobs: Vec<usize> = step_batch(n, batch, step, cfg.train.seed, cfg.data.shuffle)
            .into_iter()
            .flat_map(|i| std::iter::repeat(i).take(cfg.rollout.n))
            .collect();

        // ---- 2. Student rollouts, without autodiff. ----
        let weights = policy(&student);
        let ids: Vec<Vec<u32>> = jobs.iter().map(|&i| pairs[i].student_prompt.clone()).collect();
        let params = cfg.rollout.params(step_seed(cfg.train.seed, step));
        let rollouts: Vec<Generation> = generate_all(&weights, &ids, cfg.rollout.batch_size, &params, &tok)?;
        drop(weights);
        let t_rollout = t0.elapsed().as_secs_f64();
        // The objective is the token mean over the whole step, whatever the micro-batching.
        let step_tokens: usize = rollouts.iter().map(|g| g.token_ids.len()).sum();

        // ---- 3. Teacher and student score the same response tokens; backward per micro-batch. ----
        let mut sum = StepSum::<B>::default();
        let mut by_pos = [vec![], vec![], vec![]];
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
            let mut targets = Targets::default();
            for (r, (ps, pt, resp)) in spans.iter().enumerate() {
                targets.push_response(r * ts + ps, r * tt + pt, resp);
            }
            let m = mb.len();
            let ht = teacher.forward_hidden(t_ids, &Positions::causal(m, tt), None);
            let hs = student.forward_trunk(s_ids, &Positions::causal(m, ts), cfg.train.recompute);
            let out = backward_chunked(&divergence, &student, hs, &teacher, ht, &targets, step_tokens, cfg.divergence.chunk_size);
            let mut at = 0;
            for (_, _, resp) in &spans {
                for i in 0..resp.len() {
                    let v = out.values[at + i] as f64;
                    by_pos[if i < 10 { 0 } else if i < 30 { 1 } else { 2 }].push(v);
                }
                at += resp.len();
            }
            sum.add(&student, out);
        }
        // ---- 4. Non-finite guard, global gradient-norm clip, schedule, AdamW. ----
        let (lr, grad_norm);
        (student, lr, grad_norm) = run.update(student, &mut optim, &mut sum, step)?;

        // ---- 5. Metrics. ----
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
            loss: sum.loss,
            divergence: mean(&sum.values).unwrap_or(0.0),
            divergence_pos_0_10: mean(&by_pos[0]),
            divergence_pos_10_30: mean(&by_pos[1]),
            divergence_pos_30_plus: mean(&by_pos[2]),
            entropy: mean(&sum.entropy).unwrap_or(0.0),
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
            wall_time_s: run.wall_time(),
        };
        let msg = format!("loss {:.4} div {:.4}", m.loss, m.divergence);
        run.log(&m, msg)?;

        // ---- 6. Checkpoints, interruption. ----
        if run.end_step(step_tokens, &student, &optim, control)? == Next::Stop {
            return Ok(run.dir);
        }
    }
    // ---- The final model, as a Hugging Face folder. ----
    run.finish(&student)
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

