//! What the `opsa` commands built on training and evaluation do with their flags before the
//! work: `train`'s config and run folder, the cached inputs with an adapter, `flip-rate`'s
//! prompts, `analyze-kl`'s contexts, labelled prompts and teacher, `refine`'s output files.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use opsa_distill::{Contexts, Label, Placement};
use opsa_eval::flip::Candidate;
use opsa_eval::suite::EvalError;
use opsa_models::{open_model, CausalLm, Prompt, WeightDType};
use serde_json::Value;

use crate::{TrainConfig, TrainError};

/// `train`: the config (`config`, or with `resume` the run's own `RUN_DIR/config.toml`) with
/// the `set` overrides; with `resume` its output folder is the run's.
pub fn train_config(config: Option<&Path>, resume: Option<&Path>, set: &[String]) -> Result<TrainConfig, TrainError> {
    let config_path = match (config, resume) {
        (Some(c), _) => c.to_path_buf(),
        (None, Some(run)) => run.join("config.toml"),
        (None, None) => return Err(TrainError::Input("give --config FILE or --resume RUN_DIR".into())),
    };
    let mut overrides = set.to_vec();
    if let Some(run) = resume {
        overrides.push(format!("train.out_dir={}", toml::Value::String(run.display().to_string())));
    }
    TrainConfig::load(&config_path, &overrides)
}

/// `train`: claim the run folder for this config ([`crate::run::claim_run`]); with `resume` the
/// folder must hold a run.
pub fn claim_train_run(cfg: &TrainConfig, resume: Option<&Path>, overwrite: bool) -> Result<(), TrainError> {
    if let Some(run) = resume {
        if !run.join(opsa_eval::resume::MANIFEST).exists() && !run.join("config.toml").exists() {
            return Err(TrainError::Input(format!("{}: no run to resume (no manifest.json or config.toml)", run.display())));
        }
    }
    crate::run::claim_run(cfg, resume.is_some(), overwrite)
}

/// The recorded inputs of a cached result, with the adapter's identity when one is applied (a
/// rerun with another adapter is then refused like one with another model).
pub fn with_adapter(mut inputs: Value, adapter: Option<&Path>) -> Result<Value, TrainError> {
    if let Some(dir) = adapter {
        let id = |f: &str| opsa_eval::resume::file_identity(&dir.join(f)).map_err(EvalError::from);
        inputs["adapter"] = serde_json::json!({ "config": id("adapter_config.json")?, "weights": id("adapter_model.safetensors")? });
    }
    Ok(inputs)
}

/// `flip-rate`: the harmful prompts (a dataset of `format`, its benign items left out) and the
/// benign prompts, which benign contexts among the `candidates` need.
pub fn flip_prompts(format: &str, prompts: &Path, benign: Option<&Path>, candidates: &[Candidate]) -> Result<(Vec<Prompt>, Vec<Prompt>), TrainError> {
    let harmful = opsa_eval::datasets::load(format, prompts)
        .map_err(EvalError::from)?
        .into_iter()
        .filter(|i| i.kind != opsa_eval::datasets::Kind::Benign)
        .map(|i| i.prompt)
        .collect();
    let benign = match benign {
        Some(p) => crate::data::read_prompt_list(p)?,
        None if candidates.iter().any(|c| c.kind == "benign") => {
            return Err(TrainError::Input("the contexts file has benign contexts: give --benign-prompts FILE to measure their over-refusal".into()))
        }
        None => vec![],
    };
    Ok((harmful, benign))
}

/// `analyze-kl`: the teacher's contexts: the harmful one as text or from a file (e.g.
/// flip-rate's best-context.txt, trailing whitespace dropped), the benign one (default: the
/// harmful one).
pub fn kl_contexts(harmful: Option<&str>, harmful_file: Option<&Path>, benign: Option<&str>, placement: Placement) -> Result<Contexts, TrainError> {
    let harmful = match (harmful, harmful_file) {
        (Some(t), _) => t.to_string(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).map_err(|e| TrainError::Io(format!("cannot read {}: {e}", f.display())))?.trim_end().to_string()
        }
        (None, None) => return Err(TrainError::Input("give --teacher-context TEXT or --teacher-context-file FILE".into())),
    };
    Ok(Contexts { benign: benign.map(str::to_string).unwrap_or_else(|| harmful.clone()), harmful, placement, separator: "\n\n".into() })
}

/// `analyze-kl`: prompts (`prompt` or `messages`) with their optional `label` (harmful, the
/// default, or benign).
pub fn read_labelled_prompts(path: &Path) -> Result<Vec<(Prompt, Label)>, TrainError> {
    let mut prompts = Vec::new();
    for l in opsa_models::prompt::read_prompts(path)? {
        let label = match l.object.get("label").and_then(Value::as_str) {
            None | Some("harmful") => Label::Harmful,
            Some("benign") => Label::Benign,
            Some(o) => return Err(TrainError::Input(format!("{}:{}: label `{o}`: expected harmful or benign", path.display(), l.line))),
        };
        prompts.push((l.prompt, label));
    }
    Ok(prompts)
}

/// `analyze-kl`: the teacher: the `teacher` folder (with the student's vocabulary), else the
/// student's base with the adapter off when the student has one, else the student's weights.
pub fn kl_teacher<B: Backend>(
    student: &CausalLm<B>,
    student_dir: &Path,
    has_adapter: bool,
    teacher: Option<&Path>,
    device: &B::Device,
) -> Result<CausalLm<B>, TrainError> {
    Ok(match teacher {
        Some(t) => {
            let (m, _) = open_model::<B>(t, None, WeightDType::F32, device)?;
            if m.config.vocab_size != student.config.vocab_size {
                return Err(TrainError::Input(format!(
                    "teacher vocab_size {} differs from the student's {}",
                    m.config.vocab_size, student.config.vocab_size
                )));
            }
            m
        }
        None if has_adapter => student.without_adapters(),
        None => open_model::<B>(student_dir, None, WeightDType::F32, device)?.0,
    })
}

/// `refine`: the summary file next to `out` (`OUT` with extension `.summary.json`); neither may
/// exist unless `overwrite`.
pub fn refine_outputs(out: &Path, overwrite: bool) -> Result<PathBuf, TrainError> {
    let summary = out.with_extension("summary.json");
    for p in [out, &summary] {
        if p.exists() && !overwrite {
            return Err(TrainError::Input(format!("{}: already exists (pass --overwrite to replace it)", p.display())));
        }
    }
    Ok(summary)
}
