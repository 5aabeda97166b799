//! What every training method shares around its loop: the run folder (`config.toml`,
//! `metrics.jsonl`, `checkpoints/`, `final/`), fresh start or resume, the progress bar,
//! checkpointing and Ctrl-C at step boundaries, and the final Hugging Face export. The loops
//! themselves stay in one straight-line function per method.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, GradientsAccumulator};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::DType;
use opsa_models::lora::{load_adapter, save_adapter};
use opsa_models::{load_model, save_model, CausalLm, LoadOptions, LoraConfig, ModelConfig, WeightDType};
use serde::Serialize;

use crate::checkpoint::{list_checkpoints, load_optimizer, read_state, save_checkpoint, TrainState, Weights};
use crate::config::TrainConfig;
use crate::optim::adamw;
use crate::schedule::{cosine_with_warmup, warmup_steps};
use crate::{io, TrainError};

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

/// The optimiser every method uses.
pub type Optim<B> = OptimizerAdaptor<AdamW, CausalLm<B>, B>;

/// What the loop does after a step.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Continue,
    /// `RunControl::stop_after` reached: a checkpoint was saved; return without a final export.
    Stop,
}

pub struct Run {
    pub dir: PathBuf,
    pub state: TrainState,
    pub total: usize,
    model_dir: PathBuf,
    model_config: ModelConfig,
    save_dtype: WeightDType,
    lora: Option<LoraConfig>,
    keep: usize,
    save_every: usize,
    batch: usize,
    /// The schedule: peak lr, warmup steps, floor ratio; and the global gradient-norm clip.
    lr: f64,
    warmup: usize,
    min_lr_ratio: f64,
    grad_clip: f64,
    metrics: opsa_eval::resume::JsonlFile,
    bar: indicatif::ProgressBar,
    start: Instant,
}

/// What a run folder holds besides its manifest.
pub const RUN_FILES: &[&str] = &["config.toml", "metrics.jsonl", "checkpoints", "final", "offpolicy", "teacher", "teacher-cold-start.jsonl"];

/// What a run depends on (its manifest): the whole config but the folder itself, the identity
/// of the initial model and the contents of the data and context files.
pub fn run_inputs(cfg: &TrainConfig) -> Result<serde_json::Value, TrainError> {
    let e = opsa_eval::suite::EvalError::from;
    let mut config = serde_json::to_value(cfg).expect("config serialises");
    if let Some(t) = config["train"].as_object_mut() {
        t.remove("out_dir");
    }
    let mut files = serde_json::Map::new();
    let (d, c) = (&cfg.data, &cfg.context);
    for p in [&d.prompts, &d.examples, &c.harmful_file, &c.benign_file].into_iter().flatten() {
        files.insert(p.display().to_string(), opsa_eval::resume::file_identity(p).map_err(e)?);
    }
    let model = opsa_eval::resume::model_identity(&cfg.model.path).map_err(e)?;
    Ok(serde_json::json!({ "config": config, "model": model, "files": files }))
}

/// Check the run folder before any work: a run must not land on someone's files or on a run
/// made with other settings (refused, the first difference named), and a run with checkpoints
/// continues only with `resume`. A run of the same settings that stopped before its first
/// checkpoint starts over, with or without `resume`. Nothing is written.
pub fn check_fresh(cfg: &TrainConfig, resume: bool) -> Result<(), TrainError> {
    let run = &cfg.train.out_dir;
    opsa_models::checkpoint::recover_leftovers(run, None)?;
    opsa_models::checkpoint::recover_leftovers(&crate::checkpoint::checkpoints_dir(run), None)?;
    opsa_eval::resume::check(run, &run_inputs(cfg)?, false).map_err(opsa_eval::suite::EvalError::from)?;
    if !resume && !list_checkpoints(run).is_empty() {
        return Err(TrainError::Io(format!(
            "{}: already holds a run (use --resume to continue it, or another train.out_dir)",
            run.display()
        )));
    }
    Ok(())
}

/// [`check_fresh`]; with `overwrite`, a run folder made with other settings (or holding other
/// files) is cleared of its run files first and the run starts over.
pub fn claim_run(cfg: &TrainConfig, resume: bool, overwrite: bool) -> Result<(), TrainError> {
    if overwrite {
        start_run(cfg, true)?;
    }
    check_fresh(cfg, resume)
}

/// Record the run's inputs in its folder (its manifest) as the first thing written there.
pub fn start_run(cfg: &TrainConfig, overwrite: bool) -> Result<(), TrainError> {
    opsa_eval::resume::claim(&cfg.train.out_dir, run_inputs(cfg)?, RUN_FILES, overwrite).map_err(opsa_eval::suite::EvalError::from)?;
    Ok(())
}

/// Load a model to train: f32 master weights (f32 optimiser state follows) that compute in
/// `model.dtype` (mixed precision with `bf16`: every weight is cast where it is used, so the
/// gradients reach the masters in f32 and an update below half a bf16 ulp is kept).
pub fn load_trainable<B: AutodiffBackend>(dir: &Path, cfg: &TrainConfig, device: &B::Device) -> Result<(CausalLm<B>, ModelConfig), TrainError> {
    let compute = cfg.dtype();
    if !B::supports_dtype(device, compute.burn()) {
        return Err(TrainError::Config(format!(
            "model.dtype = \"{}\" is not supported by this backend; use f32 here (bf16 runs on the flex, cuda and wgpu backends)",
            cfg.model.dtype
        )));
    }
    let (model, config) = load_model::<B>(dir, &LoadOptions { dtype: WeightDType::F32 }, device)?;
    Ok((model.with_compute_dtype(compute.burn()), config))
}

/// A LoRA student: the base of `cfg.model.path` held in the compute dtype and frozen, with
/// f32 adapters (fresh with PEFT's initialisation seeded by `train.seed`, or read from the PEFT
/// folder `adapter`, as on resume). Only the adapters get gradients and optimiser state.
pub fn load_lora_student<B: AutodiffBackend>(cfg: &TrainConfig, lora: &LoraConfig, adapter: Option<&Path>, device: &B::Device) -> Result<(CausalLm<B>, ModelConfig), TrainError> {
    let compute = cfg.dtype();
    if !B::supports_dtype(device, compute.burn()) {
        return Err(TrainError::Config(format!("model.dtype = \"{}\" is not supported by this backend", cfg.model.dtype)));
    }
    let (base, config) = load_model::<B>(&cfg.model.path, &LoadOptions { dtype: compute }, device)?;
    let base = base.freeze();
    let model = match adapter {
        None => base.with_new_adapters(lora, cfg.train.seed, DType::F32),
        Some(dir) => {
            let (m, saved) = load_adapter(base, dir, &cfg.model.path, DType::F32)?;
            if &saved != lora {
                return Err(TrainError::Config(format!("{}: the adapter's config differs from [lora] of the run", dir.display())));
            }
            m
        }
    };
    Ok((model, config))
}

/// The frozen base of a LoRA student, without autodiff, in the compute dtype: the student's own
/// base weights with the adapters off (no second copy). What the OPSA and COPSD teachers are.
pub fn adapters_off<B: AutodiffBackend>(student: &CausalLm<B>) -> CausalLm<B::InnerBackend> {
    policy(student).without_adapters()
}

/// The weights generation runs on: the masters without autodiff, cast once to the compute dtype.
pub fn policy<B: AutodiffBackend>(student: &CausalLm<B>) -> CausalLm<B::InnerBackend> {
    student.valid().to_compute()
}

impl Run {
    /// Open the run folder and the student with its optimiser: fresh from `cfg.model.path`, or
    /// from the newest checkpoint with `resume`. `total` is the number of optimiser steps.
    pub fn open<B: AutodiffBackend>(
        cfg: &TrainConfig,
        resume: bool,
        total: usize,
        control: &RunControl,
        device: &B::Device,
    ) -> Result<(Run, CausalLm<B>, Optim<B>), TrainError> {
        check_fresh(cfg, resume)?;
        let dir = cfg.train.out_dir.clone();
        let mut optim = adamw(&cfg.optim).init::<B, CausalLm<B>>();
        // Stopped before its first checkpoint: the run starts over.
        let resume = resume && !list_checkpoints(&dir).is_empty();
        let (student, model_config, state) = if resume {
            let (_, ckpt) = list_checkpoints(&dir).pop().expect("checked");
            let state = read_state(&ckpt)?;
            let (student, model_config) = match &cfg.lora {
                // LoRA: the base again, the f32 adapters from the checkpoint.
                Some(l) => load_lora_student::<B>(cfg, l, Some(&ckpt.join("adapter")), device)?,
                None => {
                    // The f32 masters: `masters/` when the model folder was written narrower.
                    let masters = if ckpt.join("masters").is_dir() { ckpt.join("masters") } else { ckpt.join("model") };
                    load_trainable::<B>(&masters, cfg, device)?
                }
            };
            optim = load_optimizer(&ckpt, optim, device)?;
            tracing::info!("resuming {} at step {}", dir.display(), state.step);
            (student, model_config, state)
        } else {
            let (student, model_config) = match &cfg.lora {
                Some(l) => load_lora_student::<B>(cfg, l, None, device)?,
                None => load_trainable::<B>(&cfg.model.path, cfg, device)?,
            };
            (student, model_config, TrainState { total_steps: total, seed: cfg.train.seed, ..Default::default() })
        };
        start_run(cfg, false)?;
        std::fs::write(dir.join("config.toml"), cfg.to_toml()).map_err(|e| io(&dir, e))?;
        let metrics_path = dir.join("metrics.jsonl");
        truncate_metrics(&metrics_path, state.step)?;
        let metrics = opsa_eval::resume::JsonlFile::append_to(&metrics_path).map_err(opsa_eval::suite::EvalError::from)?;
        let bar = indicatif::ProgressBar::new(total as u64).with_style(
            indicatif::ProgressStyle::with_template(&format!(
                "{} {{bar:30}} step {{pos}}/{{len}} [{{elapsed_precise}} < {{eta_precise}}] {{msg}}",
                cfg.method.name()
            ))
            .expect("template"),
        );
        if !control.progress {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        bar.set_position(state.step as u64);
        let start = Instant::now() - std::time::Duration::from_secs_f64(state.wall_time_s);
        let run = Run {
            dir,
            state,
            total,
            model_dir: cfg.model.path.clone(),
            model_config,
            save_dtype: cfg.save_dtype(),
            lora: cfg.lora.clone(),
            keep: cfg.train.keep_checkpoints,
            save_every: cfg.train.save_every,
            batch: cfg.train.batch_size,
            lr: cfg.optim.lr,
            warmup: warmup_steps(total, cfg.schedule.warmup_ratio),
            min_lr_ratio: cfg.schedule.min_lr_ratio,
            grad_clip: cfg.optim.grad_clip,
            metrics,
            bar,
            start,
        };
        Ok((run, student, optim))
    }

    /// The learning rate of optimiser step `step` (0-based): cosine with linear warmup.
    pub fn lr(&self, step: usize) -> f64 {
        cosine_with_warmup(step, self.total, self.lr, self.warmup, self.min_lr_ratio)
    }

    /// The end of a step's backward passes: the step's learning rate, then the optimiser step
    /// on what `sum` accumulated ([`StepSum::apply`]). Returns the updated student, the learning
    /// rate and the gradient norm before clipping.
    pub fn update<B: AutodiffBackend>(
        &self,
        student: CausalLm<B>,
        optim: &mut Optim<B>,
        sum: &mut StepSum<B>,
        step: usize,
    ) -> Result<(CausalLm<B>, f64, f64), TrainError> {
        let lr = self.lr(step);
        let (student, grad_norm) = sum.apply(student, optim, lr, self.grad_clip, step, &self.dir)?;
        Ok((student, lr, grad_norm))
    }

    /// Seconds since the run started (across resumes).
    pub fn wall_time(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Append one line to `metrics.jsonl` and show `msg` by the progress bar.
    pub fn log<M: Serialize>(&mut self, m: &M, msg: String) -> Result<(), TrainError> {
        self.metrics.append(m).map_err(opsa_eval::suite::EvalError::from)?;
        tracing::info!(step = self.state.step + 1, "{msg}");
        self.bar.set_message(msg);
        self.bar.inc(1);
        Ok(())
    }

    /// A warning the user must see: above the progress bar and in the log.
    pub fn warn(&self, msg: &str) {
        tracing::warn!("{msg}");
        self.bar.suspend(|| eprintln!("warning: {msg}"));
    }

    /// Advance the state by one finished step and checkpoint when due (every
    /// `train.save_every` steps, at the end, on Ctrl-C and at `stop_after`).
    pub fn end_step<B: AutodiffBackend>(
        &mut self,
        tokens: usize,
        student: &CausalLm<B>,
        optim: &Optim<B>,
        control: &RunControl,
    ) -> Result<Next, TrainError> {
        let s = &mut self.state;
        s.step += 1;
        s.prompts_seen = s.step * self.batch;
        s.tokens_trained += tokens;
        s.wall_time_s = self.start.elapsed().as_secs_f64();
        let interrupted = control.interrupt.is_some_and(|f| f.load(Ordering::SeqCst));
        let stop_here = control.stop_after == Some(s.step);
        let periodic = self.save_every > 0 && s.step % self.save_every == 0;
        if periodic || interrupted || stop_here || s.step == self.total {
            let weights = match &self.lora {
                Some(l) => Weights::Adapter(l),
                None => Weights::Full(self.save_dtype),
            };
            save_checkpoint(&self.dir, s, student, &self.model_config, &self.model_dir, weights, optim, self.keep)?;
        }
        if interrupted {
            self.bar.abandon();
            return Err(TrainError::Interrupted(format!(
                "stopped after step {}; checkpoint saved; continue with --resume {}",
                s.step,
                self.dir.display()
            )));
        }
        if stop_here {
            self.bar.abandon();
            return Ok(Next::Stop);
        }
        Ok(Next::Continue)
    }

    /// The final model, as a Hugging Face folder `RUN/final` (with LoRA: merged, and the adapter
    /// alone in PEFT's format in `RUN/adapter`).
    pub fn finish<B: AutodiffBackend>(self, student: &CausalLm<B>) -> Result<PathBuf, TrainError> {
        self.bar.finish();
        let final_dir = self.dir.join("final");
        let weights = student.valid();
        // A model with adapters is saved merged (`hf_tensors`).
        save_model(&weights, &self.model_config, Some(&self.model_dir), &final_dir, self.save_dtype, true)?;
        if let Some(l) = &self.lora {
            save_adapter(&weights, l, &self.model_dir.display().to_string(), &self.dir.join("adapter"), true)?;
        }
        Ok(final_dir)
    }
}

/// On resume, drop metric lines of steps after the checkpoint (they will be redone), and a
/// line torn by a kill.
fn truncate_metrics(path: &Path, step: usize) -> Result<(), TrainError> {
    let lines = opsa_eval::resume::read_jsonl(path).map_err(opsa_eval::suite::EvalError::from)?;
    let kept: String = lines
        .into_iter()
        .filter(|(_, l)| {
            serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v.get("step").and_then(|s| s.as_u64())).is_some_and(|s| s as usize <= step)
        })
        .map(|(_, l)| format!("{l}\n"))
        .collect();
    opsa_eval::resume::write_atomic(path, &kept).map_err(opsa_eval::suite::EvalError::from)?;
    Ok(())
}

/// What the micro-batches of one optimiser step add up to: their gradients, the step loss (each
/// brings its share of the token mean over the step) and the per-token values and student
/// entropy of [`opsa_distill::DistillGrads`], in target order.
pub struct StepSum<B: AutodiffBackend> {
    grads: GradientsAccumulator<CausalLm<B>>,
    pub loss: f64,
    pub values: Vec<f64>,
    pub entropy: Vec<f64>,
}

impl<B: AutodiffBackend> Default for StepSum<B> {
    fn default() -> Self {
        StepSum { grads: GradientsAccumulator::new(), loss: 0.0, values: vec![], entropy: vec![] }
    }
}

impl<B: AutodiffBackend> StepSum<B> {
    /// Add one micro-batch's backward pass.
    pub fn add(&mut self, model: &CausalLm<B>, out: opsa_distill::DistillGrads) {
        self.loss += out.loss;
        self.values.extend(out.values.iter().map(|&v| v as f64));
        self.entropy.extend(out.entropy.iter().map(|&v| v as f64));
        self.grads.accumulate(model, out.grads);
    }

    /// [`optimizer_step`] on the accumulated gradients and loss, at `lr`; the gradients are
    /// consumed (the loss, values and entropy stay for the metrics).
    pub fn apply(&mut self, model: CausalLm<B>, optim: &mut Optim<B>, lr: f64, grad_clip: f64, step: usize, run_dir: &Path) -> Result<(CausalLm<B>, f64), TrainError> {
        optimizer_step(model, optim, self.grads.grads(), self.loss, lr, grad_clip, step, run_dir)
    }
}

/// The end of every optimiser step: a NaN or infinite loss or gradient norm stops the run (the
/// last checkpoint stays intact); otherwise the global gradient-norm clip (`grad_clip`, 0 = off)
/// and one AdamW step at `lr`. Returns the updated model and the norm before clipping.
#[allow(clippy::too_many_arguments)]
pub fn optimizer_step<B: AutodiffBackend>(
    model: CausalLm<B>,
    optim: &mut Optim<B>,
    mut grads: burn::optim::GradientsParams,
    loss: f64,
    lr: f64,
    grad_clip: f64,
    step: usize,
    run_dir: &Path,
) -> Result<(CausalLm<B>, f64), TrainError> {
    use burn::optim::Optimizer;
    let kept = || match list_checkpoints(run_dir).pop() {
        Some((n, _)) => format!("the last checkpoint in {} (step {n}) is intact", run_dir.display()),
        None => format!("no checkpoint was saved yet in {}; rerunning starts over", run_dir.display()),
    };
    if !loss.is_finite() {
        return Err(TrainError::NonFinite(format!("loss is {loss} at step {}; {}", step + 1, kept())));
    }
    let grad_norm = crate::optim::clip_global_grad_norm::<B, _>(&model, &mut grads, grad_clip);
    if !grad_norm.is_finite() {
        return Err(TrainError::NonFinite(format!("gradient norm is {grad_norm} at step {}; {}", step + 1, kept())));
    }
    Ok((optim.step(lr, model, grads), grad_norm))
}

/// Generate for every prompt, `batch` at a time. Row k draws from stream k of `params.seed`,
/// so the result does not depend on `batch`.
pub fn generate_all<B: burn::tensor::backend::Backend>(
    model: &CausalLm<B>,
    prompts: &[Vec<u32>],
    batch: usize,
    params: &opsa_generate::SamplingParams,
    tok: &opsa_models::HfTokenizer,
) -> Result<Vec<opsa_generate::Generation>, TrainError> {
    let mut out = Vec::with_capacity(prompts.len());
    for (c, chunk) in prompts.chunks(batch.max(1)).enumerate() {
        let index: Vec<u64> = (0..chunk.len()).map(|k| (c * batch + k) as u64).collect();
        out.extend(opsa_generate::generate(model, chunk, &index, params, tok.eos_ids(), Some(tok))?);
    }
    Ok(out)
}

/// Mean of a slice (None when empty).
pub fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Right-padded `[rows, longest]` ids (pad 0; causal attention never looks at later padding).
pub fn padded<B: burn::tensor::backend::Backend>(seqs: &[Vec<u32>], device: &B::Device) -> (burn::tensor::Tensor<B, 2, burn::tensor::Int>, usize) {
    let t = seqs.iter().map(Vec::len).max().unwrap_or(1);
    let mut ids = Vec::with_capacity(seqs.len() * t);
    for s in seqs {
        ids.extend(s.iter().map(|&x| x as i64).chain(std::iter::repeat(0).take(t - s.len())));
    }
    (burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(ids, [seqs.len(), t]), device), t)
}
