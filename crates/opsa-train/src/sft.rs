//! The supervised arms of the comparison, all over one example loop ([`train_on_examples`]):
//!
//! - [`train_sft`]: prompt-masked cross-entropy on (prompt, response) examples;
//! - [`train_external_kd`]: the same examples, and with `[kd] teacher` token-level logit
//!   distillation (forward KL by default) from that teacher on the examples' tokens;
//! - [`train_offpolicy_sd`]: the frozen model with the privileged context answers every
//!   training prompt once (`rollout.n` samples), a judge keeps the acceptable answers, and the
//!   student is trained by SFT on them *without* the context.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::backend::AutodiffBackend;
use opsa_distill::{backward_objective, Divergence, Label, Objective, Pair, Targets};
use opsa_eval::refusal::{classify, Verdict};
use opsa_models::decoder::Positions;
use opsa_models::{load_model, CausalLm, HfTokenizer, LoadOptions};
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::data::{check_rollouts_fit, end_of_turn, pack, read_examples, read_jsonl, read_prompts, step_batch, tokenize_example, Tokenized};
use crate::run::{check_fresh, generate_all, mean, padded, Next, Run, RunControl, StepSum};
use crate::{write_atomic, TrainError};

/// One line of `metrics.jsonl` for the supervised methods.
#[derive(Debug, Clone, Serialize)]
pub struct SftMetrics {
    pub step: usize,
    /// The step's objective: token mean of the per-token loss over its response tokens.
    pub loss: f64,
    /// Mean per-token NLL (SFT) or divergence (KD) over the step's response tokens.
    pub value: f64,
    /// Student entropy (nats) at response positions.
    pub entropy: f64,
    /// Response tokens trained on, examples and forward rows (rows < examples when packing).
    pub tokens: usize,
    pub examples: usize,
    pub rows: usize,
    /// Share of the forward passes' token slots that were padding.
    pub padding: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub train_tokens_per_s: f64,
    pub step_time_s: f64,
    pub wall_time_s: f64,
}

/// Read, render and check the examples of `data.examples`.
fn examples_for(cfg: &TrainConfig, tok: &HfTokenizer, max_pos: usize) -> Result<Vec<Tokenized>, TrainError> {
    let path = cfg.data.examples.as_ref().expect("validated");
    let raw = read_examples(path)?;
    let vars = cfg.chat_vars();
    let eot = end_of_turn(tok, &vars)?;
    let mut out = Vec::with_capacity(raw.len());
    for ex in &raw {
        let t = tokenize_example(tok, &vars, &eot, ex).map_err(|e| TrainError::Data(format!("{}:{}: {e}", path.display(), ex.line)))?;
        if t.len() > max_pos {
            return Err(TrainError::Data(format!(
                "{}:{}: prompt and response take {} tokens, more than the model's context (max_position_embeddings {max_pos})",
                path.display(),
                ex.line,
                t.len()
            )));
        }
        if cfg.data.packing && cfg.data.pack_len > 0 && t.len() > cfg.data.pack_len {
            return Err(TrainError::Data(format!(
                "{}:{}: the example takes {} tokens, more than data.pack_len ({})",
                path.display(),
                ex.line,
                t.len(),
                cfg.data.pack_len
            )));
        }
        out.push(t);
    }
    Ok(out)
}

/// Supervised fine-tuning with prompt-masked cross-entropy on `data.examples`.
pub fn train_sft<B: AutodiffBackend>(cfg: &TrainConfig, resume: bool, control: &RunControl, device: &B::Device) -> Result<PathBuf, TrainError> {
    check_fresh(cfg, resume)?;
    let tok = HfTokenizer::from_dir(&cfg.model.path)?;
    let model_cfg = read_model_config(&cfg.model.path)?;
    tok.check_vocab(model_cfg.0)?;
    let examples = examples_for(cfg, &tok, model_cfg.1)?;
    train_on_examples::<B>(cfg, resume, control, device, examples, None)
}

/// External-teacher distillation: SFT on the examples, or (with `[kd] teacher`) logit
/// distillation from the teacher on the examples' tokens with `[divergence]`.
pub fn train_external_kd<B: AutodiffBackend>(cfg: &TrainConfig, resume: bool, control: &RunControl, device: &B::Device) -> Result<PathBuf, TrainError> {
    check_fresh(cfg, resume)?;
    let tok = HfTokenizer::from_dir(&cfg.model.path)?;
    let (vocab, max_pos) = read_model_config(&cfg.model.path)?;
    tok.check_vocab(vocab)?;
    let teacher = match &cfg.kd.teacher {
        None => None,
        Some(dir) => {
            check_teacher_vocabulary(&cfg.model.path, dir)?;
            let (t, _) = load_model::<B::InnerBackend>(dir, &LoadOptions { dtype: cfg.dtype() }, device)?;
            Some((t, cfg.divergence.divergence()?))
        }
    };
    let examples = examples_for(cfg, &tok, max_pos)?;
    train_on_examples::<B>(cfg, resume, control, device, examples, teacher)
}

/// Logit distillation needs one vocabulary: the teacher folder's `vocab_size` and tokenizer must
/// be the student's (same size, same split of a probe text), checked without loading weights.
pub fn check_teacher_vocabulary(student: &Path, teacher: &Path) -> Result<(), TrainError> {
    let (tok, t_tok) = (HfTokenizer::from_dir(student)?, HfTokenizer::from_dir(teacher)?);
    let ((vocab, _), (t_vocab, _)) = (read_model_config(student)?, read_model_config(teacher)?);
    if t_vocab != vocab || t_tok.vocab_size() != tok.vocab_size() {
        return Err(TrainError::Config(format!(
            "kd.teacher {}: vocabulary (vocab_size {t_vocab}, {} tokenizer tokens) differs from the student's (vocab_size {vocab}, {} tokens) in {}; logit distillation needs one vocabulary",
            teacher.display(),
            t_tok.vocab_size(),
            tok.vocab_size(),
            student.display()
        )));
    }
    let probe = "Hello, world! 12345 <think>";
    if t_tok.encode(probe, false)? != tok.encode(probe, false)? {
        return Err(TrainError::Config(format!("kd.teacher {}: its tokenizer splits text differently from the student's", teacher.display())));
    }
    Ok(())
}

/// `(vocab_size, max_position_embeddings)` from a folder's config.json, without loading weights.
fn read_model_config(dir: &Path) -> Result<(usize, usize), TrainError> {
    let path = dir.join("config.json");
    let d = opsa_models::ModelConfig::from_file(&path)?.decoder(&path)?;
    Ok((d.vocab_size, d.max_position_embeddings))
}

/// One answer of the frozen model with the context, and what the judge made of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OffpolicySample {
    pub prompt_index: usize,
    pub prompt: String,
    pub label: Label,
    pub response: String,
    pub token_ids: Vec<u32>,
    pub finished: bool,
    pub kept: bool,
    pub reason: String,
}

/// Read `RUN/offpolicy/samples.jsonl` back (a resumed run, the demo's findings).
pub fn read_offpolicy_samples(path: &Path) -> Result<Vec<OffpolicySample>, TrainError> {
    read_jsonl(path)?
        .into_iter()
        .map(|(n, v)| serde_json::from_value(v).map_err(|e| TrainError::Data(format!("{}:{n}: {e}", path.display()))))
        .collect()
}

/// What `offpolicy/summary.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OffpolicySummary {
    pub judge: String,
    pub generated: usize,
    pub kept: usize,
    pub kept_harmful: usize,
    pub generated_harmful: usize,
    pub kept_benign: usize,
    pub generated_benign: usize,
}

/// Whether an off-policy answer is kept: harmful prompts need a safe (judged not harmful)
/// answer, benign prompts an answer that does not refuse; truncated answers never count.
pub fn offpolicy_keep(label: Label, response: &str, finished: bool, judged_harmful: Option<bool>) -> (bool, &'static str) {
    let verdict = classify(response);
    if !finished || verdict == Verdict::Truncated {
        return (false, "truncated");
    }
    match label {
        Label::Harmful => match judged_harmful {
            Some(false) => (true, "safe"),
            Some(true) => (false, "judged harmful"),
            None => (false, "judge undecided"),
        },
        Label::Benign => match verdict {
            Verdict::Compliance => (true, "helpful"),
            _ => (false, "over-refusal"),
        },
    }
}

/// Off-policy self-distillation (ThinkSafe-style).
pub fn train_offpolicy_sd<B: AutodiffBackend>(cfg: &TrainConfig, resume: bool, control: &RunControl, device: &B::Device) -> Result<PathBuf, TrainError> {
    check_fresh(cfg, resume)?;
    let prompts_path = cfg.data.prompts.as_ref().expect("validated");
    let prompts = read_prompts(prompts_path)?;
    let tok = HfTokenizer::from_dir(&cfg.model.path)?;
    let vars = cfg.chat_vars();
    let contexts = cfg.contexts()?;
    let pairs: Vec<Pair> = prompts
        .iter()
        .map(|p| Pair::new(&tok, &vars, &contexts, &p.prompt, p.label).map_err(TrainError::Config))
        .collect::<Result<_, _>>()?;
    let (vocab, max_pos) = read_model_config(&cfg.model.path)?;
    tok.check_vocab(vocab)?;
    check_rollouts_fit(&pairs, cfg.rollout.max_new_tokens, max_pos, prompts_path, "context")?;
    let eot = end_of_turn(&tok, &vars)?;

    // ---- 1. The frozen model with the context answers once (kept across a resume). ----
    let dir = cfg.train.out_dir.join("offpolicy");
    let samples_path = dir.join("samples.jsonl");
    let samples: Vec<OffpolicySample> = if samples_path.exists() {
        read_offpolicy_samples(&samples_path)?
    } else {
        let mut judge = opsa_eval::judge::from_spec::<B::InnerBackend>(&cfg.offpolicy.judge, cfg.offpolicy.judge_template.as_deref(), device)?;
        let (frozen, _) = load_model::<B::InnerBackend>(&cfg.model.path, &LoadOptions { dtype: cfg.dtype() }, device)?;
        let params = cfg.rollout.params(cfg.train.seed);
        let jobs: Vec<usize> = (0..prompts.len()).flat_map(|i| std::iter::repeat(i).take(cfg.rollout.n)).collect();
        let ids: Vec<Vec<u32>> = jobs.iter().map(|&i| pairs[i].teacher_prompt.clone()).collect();
        if control.progress {
            eprintln!("off-policy self-distillation: the frozen model with the context answers {} prompts", jobs.len());
        }
        let gens = generate_all(&frozen, &ids, cfg.rollout.batch_size, &params, &tok)?;
        let items: Vec<(String, String)> = jobs.iter().zip(&gens).map(|(&i, g)| (prompts[i].prompt.request().to_string(), g.text.clone())).collect();
        let verdicts = judge.judge(&items)?;
        let mut out = Vec::with_capacity(jobs.len());
        for ((&i, g), v) in jobs.iter().zip(gens).zip(verdicts) {
            let finished = g.finish_reason == opsa_generate::FinishReason::Stop;
            let (kept, reason) = offpolicy_keep(prompts[i].label, &g.text, finished, v.harmful);
            out.push(OffpolicySample {
                prompt_index: i,
                prompt: prompts[i].prompt.request().to_string(),
                label: prompts[i].label,
                response: g.text,
                token_ids: g.token_ids,
                finished,
                kept,
                reason: reason.into(),
            });
        }
        let count = |l: Label, kept: bool| out.iter().filter(|s| s.label == l && (!kept || s.kept)).count();
        let summary = OffpolicySummary {
            judge: judge.name(),
            generated: out.len(),
            kept: out.iter().filter(|s| s.kept).count(),
            kept_harmful: count(Label::Harmful, true),
            generated_harmful: count(Label::Harmful, false),
            kept_benign: count(Label::Benign, true),
            generated_benign: count(Label::Benign, false),
        };
        crate::run::start_run(cfg, false)?;
        write_atomic(&dir.join("summary.json"), serde_json::to_string_pretty(&summary).expect("serialises"))?;
        write_atomic(&samples_path, out.iter().map(|s| serde_json::to_string(s).expect("serialises") + "\n").collect::<String>())?;
        eprintln!(
            "off-policy self-distillation: the judge kept {} of {} answers (harmful {}/{}, benign {}/{}); details in {}",
            summary.kept,
            summary.generated,
            summary.kept_harmful,
            summary.generated_harmful,
            summary.kept_benign,
            summary.generated_benign,
            dir.display()
        );
        out
    };

    // ---- 2. SFT on the kept answers, rendered without the context. ----
    let examples: Vec<Tokenized> = samples
        .iter()
        .filter(|s| s.kept)
        .map(|s| {
            let mut response = s.token_ids.clone();
            // A kept answer ended with EOS; train on the template's own end of turn.
            if response.last().is_some_and(|t| tok.eos_ids().contains(t)) {
                response.pop();
            }
            response.extend_from_slice(&eot);
            Tokenized { prompt: pairs[s.prompt_index].student_prompt.clone(), response, label: Some(s.label) }
        })
        .collect();
    if examples.is_empty() {
        return Err(TrainError::Data(format!(
            "the judge kept none of the {} off-policy answers (see {}); nothing to train on",
            samples.len(),
            samples_path.display()
        )));
    }
    train_on_examples::<B>(cfg, resume, control, device, examples, None)
}

/// The example loop: `train.batch_size` examples per optimiser step ([`examples_backward`]),
/// token-mean loss over the step. Cross-entropy without a teacher; the divergence to the
/// teacher's distributions with one.
pub fn train_on_examples<B: AutodiffBackend>(
    cfg: &TrainConfig,
    resume: bool,
    control: &RunControl,
    device: &B::Device,
    examples: Vec<Tokenized>,
    teacher: Option<(CausalLm<B::InnerBackend>, Divergence)>,
) -> Result<PathBuf, TrainError> {
    let (n, batch) = (examples.len(), cfg.train.batch_size);
    let total = cfg.total_steps(n);
    let longest = examples.iter().map(Tokenized::len).max().unwrap_or(1);
    let pack_len = if cfg.data.pack_len == 0 { longest } else { cfg.data.pack_len };
    let packing = cfg.data.packing.then_some(pack_len);
    let (mut run, mut student, mut optim) = Run::open::<B>(cfg, resume, total, control, device)?;
    if let Some((t, _)) = &teacher {
        if t.config.vocab_size != student.config.vocab_size {
            return Err(TrainError::Config(format!("teacher vocab_size {} differs from the student's {}", t.config.vocab_size, student.config.vocab_size)));
        }
    }

    for step in run.state.step..total {
        let t0 = Instant::now();
        // ---- 1. This step's examples; the objective is the token mean over all of them. ----
        let idx = step_batch(n, batch, step, cfg.train.seed, cfg.data.shuffle);
        let step_tokens: usize = idx.iter().map(|&i| examples[i].response.len()).sum();

        // ---- 2. Forward/backward per micro-batch, examples packed into rows. ----
        let (mut sum, rows) = examples_backward(cfg, &student, &examples, &idx, packing, teacher.as_ref(), device);

        // ---- 3. Non-finite guard, global clip, schedule, AdamW. ----
        let (lr, grad_norm);
        (student, lr, grad_norm) = run.update(student, &mut optim, &mut sum, step)?;

        // ---- 4. Metrics, checkpoints. ----
        let step_time = t0.elapsed().as_secs_f64();
        let m = SftMetrics {
            step: step + 1,
            loss: sum.loss,
            value: mean(&sum.values).unwrap_or(0.0),
            entropy: mean(&sum.entropy).unwrap_or(0.0),
            tokens: step_tokens,
            examples: idx.len(),
            rows: rows.rows,
            padding: 1.0 - rows.used as f64 / rows.slots.max(1) as f64,
            lr,
            grad_norm,
            train_tokens_per_s: step_tokens as f64 / step_time.max(1e-9),
            step_time_s: step_time,
            wall_time_s: run.wall_time(),
        };
        let msg = format!("loss {:.4}", m.loss);
        run.log(&m, msg)?;
        if run.end_step(step_tokens, &student, &optim, control)? == Next::Stop {
            return Ok(run.dir);
        }
    }
    run.finish(&student)
}

/// How the examples of a step filled the forward passes' rows.
#[derive(Debug, Clone, Copy, Default)]
pub struct RowUse {
    /// Forward rows (fewer than examples when packing).
    pub rows: usize,
    /// Token slots of those rows, and how many held tokens (the rest was padding).
    pub slots: usize,
    pub used: usize,
}

/// Forward and backward of the examples `idx` of one optimiser step, `train.micro_batch_size`
/// per forward pass; with `packing = Some(pack_len)` packed into rows of at most `pack_len`
/// tokens, else one example per row. The loss is prompt-masked cross-entropy, or with a teacher
/// its divergence, as a token mean over all of the step's response tokens.
pub fn examples_backward<B: AutodiffBackend>(
    cfg: &TrainConfig,
    student: &CausalLm<B>,
    examples: &[Tokenized],
    idx: &[usize],
    packing: Option<usize>,
    teacher: Option<&(CausalLm<B::InnerBackend>, Divergence)>,
    device: &B::Device,
) -> (StepSum<B>, RowUse) {
    let step_tokens: usize = idx.iter().map(|&i| examples[i].response.len()).sum();
    let mut sum = StepSum::default();
    let mut fill = RowUse::default();
    for mb in idx.chunks(cfg.train.micro_batch_size) {
        let lengths: Vec<usize> = mb.iter().map(|&i| examples[i].len()).collect();
        let rows = pack(&lengths, packing.is_some(), packing.unwrap_or(0));
        let mut seqs = vec![];
        let mut segments = vec![];
        let mut targets = Targets::default();
        let t = rows.iter().map(|r| r.iter().map(|&k| lengths[k]).sum::<usize>()).max().unwrap_or(1);
        for (r, row) in rows.iter().enumerate() {
            let (mut seq, mut segs) = (vec![], vec![]);
            for &k in row {
                let ex = &examples[mb[k]];
                // One stream: the student's positions are the teacher's.
                let at = r * t + seq.len() + ex.prompt.len();
                targets.push_response(at, at, &ex.response);
                seq.extend_from_slice(&ex.prompt);
                seq.extend_from_slice(&ex.response);
                segs.push(ex.len());
            }
            fill.used += seq.len();
            seqs.push(seq);
            segments.push(segs);
        }
        fill.rows += rows.len();
        fill.slots += rows.len() * t;
        let (ids, t_pad) = padded::<B>(&seqs, device);
        debug_assert_eq!(t_pad, t);
        let pos = if packing.is_some() { Positions::packed(&segments, t) } else { Positions::causal(rows.len(), t) };
        let hs = student.forward_trunk(ids.clone(), &pos, cfg.train.recompute); // [rows, t, hidden]
        let out = match teacher {
            None => backward_objective(&Objective::CrossEntropy, student, hs, None, &targets, step_tokens, cfg.divergence.chunk_size),
            Some((tm, div)) => {
                let ht = tm.forward_hidden(ids.inner(), &pos, None); // same layout as the student's
                backward_objective(&Objective::Distill(div), student, hs, Some((tm, ht)), &targets, step_tokens, cfg.divergence.chunk_size)
            }
        };
        sum.add(student, out);
    }
    (sum, fill)
}
