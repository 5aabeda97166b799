//! Training checkpoints: `RUN_DIR/checkpoints/step-NNNNNN/` holding the model as a Hugging Face
//! folder (`model/`, in `model.save_dtype`), the f32 master weights as another (`masters/`, only
//! when `model/` is narrower than f32) — or, with LoRA, only the f32 adapters in PEFT's format
//! (`adapter/`) —, the optimiser state (`optimizer.bin`, full precision) and `state.json`
//! (step, seed, counters). Each checkpoint is written under a temporary name and renamed into
//! place, so a crash or Ctrl-C never leaves a half-written one; the newest complete checkpoint
//! is what `--resume` picks up.

use std::path::{Path, PathBuf};

use burn::module::AutodiffModule;
use burn::optim::Optimizer;
use burn::record::{BinFileRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::AutodiffBackend;
use opsa_models::lora::save_adapter;
use opsa_models::{save_model, CausalLm, LoraConfig, ModelConfig, WeightDType};
use serde::{Deserialize, Serialize};

use crate::{io, TrainError};

/// Where a run stands. The data order and the rollout seeds are pure functions of
/// `(seed, step)`, so this is all the RNG state a resume needs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Optimiser steps completed.
    pub step: usize,
    pub total_steps: usize,
    pub seed: u64,
    /// Prompts consumed (the data cursor: `step * batch_size`).
    pub prompts_seen: usize,
    pub tokens_trained: usize,
    pub wall_time_s: f64,
    /// First-step entropy and mean response length: the reference of the collapse warnings.
    #[serde(default)]
    pub start_entropy: Option<f64>,
    #[serde(default)]
    pub start_response_len: Option<f64>,
}

/// What a checkpoint holds of the model.
#[derive(Debug, Clone, Copy)]
pub enum Weights<'a> {
    /// The whole model in this dtype (`model/`), and the f32 masters (`masters/`) when narrower.
    Full(WeightDType),
    /// Only the f32 LoRA adapters, in PEFT's format (`adapter/`); the base is `model.path`.
    Adapter(&'a LoraConfig),
}

pub fn checkpoints_dir(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

/// Write a checkpoint atomically and prune old ones (keeping `keep`).
#[allow(clippy::too_many_arguments)]
pub fn save_checkpoint<B: AutodiffBackend, O: Optimizer<CausalLm<B>, B>>(
    run: &Path,
    state: &TrainState,
    model: &CausalLm<B>,
    model_config: &ModelConfig,
    side_files: &Path,
    weights: Weights,
    optim: &O,
    keep: usize,
) -> Result<PathBuf, TrainError> {
    let dir = checkpoints_dir(run);
    std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
    let name = format!("step-{:06}", state.step);
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    let write = || -> Result<(), TrainError> {
        let model = model.valid();
        match weights {
            Weights::Full(dtype) => {
                save_model(&model, model_config, Some(side_files), &tmp.join("model"), dtype, false)?;
                if dtype != WeightDType::F32 {
                    save_model(&model, model_config, Some(side_files), &tmp.join("masters"), WeightDType::F32, false)?;
                }
            }
            Weights::Adapter(l) => save_adapter(&model, l, &side_files.display().to_string(), &tmp.join("adapter"), false)?,
        }
        BinFileRecorder::<FullPrecisionSettings>::new()
            .record(optim.to_record(), tmp.join("optimizer"))
            .map_err(|e| io(&tmp.join("optimizer.bin"), e))?;
        let p = tmp.join("state.json");
        std::fs::write(&p, serde_json::to_string_pretty(state).expect("state serialises")).map_err(|e| io(&p, e))
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let out = dir.join(&name);
    if out.exists() {
        std::fs::remove_dir_all(&out).map_err(|e| io(&out, e))?;
    }
    std::fs::rename(&tmp, &out).map_err(|e| io(&out, e))?;
    // Prune: keep the newest `keep` complete checkpoints.
    let mut all = list_checkpoints(run);
    while all.len() > keep.max(1) {
        let (_, old) = all.remove(0);
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(out)
}

/// Complete checkpoints, oldest first.
pub fn list_checkpoints(run: &Path) -> Vec<(usize, PathBuf)> {
    let mut v: Vec<(usize, PathBuf)> = std::fs::read_dir(checkpoints_dir(run))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            e.path().join("state.json").is_file().then_some((step, e.path()))
        })
        .collect();
    v.sort();
    v
}

pub fn read_state(ckpt: &Path) -> Result<TrainState, TrainError> {
    let p = ckpt.join("state.json");
    let text = std::fs::read_to_string(&p).map_err(|e| io(&p, e))?;
    serde_json::from_str(&text).map_err(|e| io(&p, e))
}

/// Restore the optimiser state saved in a checkpoint.
pub fn load_optimizer<B: AutodiffBackend, O: Optimizer<CausalLm<B>, B>>(ckpt: &Path, optim: O, device: &B::Device) -> Result<O, TrainError> {
    let p = ckpt.join("optimizer");
    let record = BinFileRecorder::<FullPrecisionSettings>::new().load(p.clone(), device).map_err(|e| io(&p, e))?;
    Ok(optim.load_record(record))
}
