//! The comparison recipe: every arm on the same base model, prompts, judge and evaluation, then
//! one `opsa report`. A recipe is a TOML file (see `configs/compare/`); `opsa compare` runs it:
//!
//! 1. evaluate the base model (`OUT/eval/base`);
//! 2. optionally search the privileged context by teacher flip rate (`OUT/flip-rate`), and give
//!    the best one to the arms that ask for it (`best_context = true`);
//! 3. per arm: optionally refine its examples with DGR (`OUT/refine/ARM.jsonl`), train
//!    (`OUT/train/ARM`), evaluate the final model (`OUT/eval/ARM`);
//! 4. `opsa report` over all of it (`OUT/report`: table.md and the plots).
//!
//! Every stage resumes: a finished stage is skipped, an interrupted training run continues from
//! its newest checkpoint, an interrupted evaluation from its cached items.

use std::path::{Path, PathBuf};

use burn::tensor::backend::{AutodiffBackend, Backend};
use opsa_eval::suite::{eval_inputs, finished, run_suite, Suite};
use opsa_generate::SamplingParams;
use opsa_models::{load_model, HfTokenizer, LoadOptions};
use serde::{Deserialize, Serialize};

use crate::config::{apply_override, json_map, Method, TrainConfig};
use crate::RunControl;
use crate::TrainError;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Everything goes under this folder.
    pub out_dir: PathBuf,
    /// The base model every arm starts from (overrides each arm config's `model.path`).
    pub model: PathBuf,
    /// The evaluation suite (configs/eval/*.toml) every model is scored on.
    pub suite: PathBuf,
    /// Safety judge for the evaluation, the flip-rate search and off-policy filtering:
    /// `refusal`, `model:DIR` or `http:URL`.
    #[serde(default = "refusal")]
    pub judge: String,
    #[serde(default)]
    pub judge_template: Option<PathBuf>,
    /// Overrides applied to every arm's config (`train.steps=100`, `model.dtype="bf16"`).
    #[serde(default)]
    pub set: Vec<String>,
    #[serde(default)]
    pub flip_rate: Option<FlipSection>,
    #[serde(rename = "arm")]
    pub arms: Vec<Arm>,
}

fn refusal() -> String {
    "refusal".into()
}

/// The context search before training.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlipSection {
    /// Candidates, JSONL {"id", "context", "kind"}.
    pub contexts: PathBuf,
    /// Harmful prompts (JSONL with `prompt`).
    pub prompts: PathBuf,
    /// Benign prompts for the benign contexts' over-refusal.
    #[serde(default)]
    pub benign_prompts: Option<PathBuf>,
    #[serde(default = "prepend")]
    pub placement: String,
    #[serde(default = "n256")]
    pub max_new_tokens: usize,
    #[serde(default = "n16")]
    pub batch_size: usize,
    #[serde(default)]
    pub chat_vars: toml::Table,
}

fn prepend() -> String {
    "prepend".into()
}
fn n256() -> usize {
    256
}
fn n16() -> usize {
    16
}
fn n1024() -> usize {
    1024
}
fn n8() -> usize {
    8
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Arm {
    /// Names the arm's folders and its row in the report.
    pub name: String,
    /// Its training config (any method).
    pub config: PathBuf,
    /// Overrides for this arm only, applied after the recipe's.
    #[serde(default)]
    pub set: Vec<String>,
    /// Train with the flip-rate search's best context as `context.harmful_file`.
    #[serde(default)]
    pub best_context: bool,
    /// DGR: refine these examples with the base model first and train on the result.
    #[serde(default)]
    pub refine: Option<RefineSection>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefineSection {
    pub data: PathBuf,
    /// Rewrite prompt (default: the built-in configs/refine/dgr-rewrite.txt).
    #[serde(default)]
    pub template: Option<PathBuf>,
    #[serde(default = "n1024")]
    pub max_new_tokens: usize,
    #[serde(default = "n8")]
    pub batch_size: usize,
    #[serde(default)]
    pub chat_vars: toml::Table,
}

fn cfg_err(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Config(format!("{}: {e}", path.display()))
}

impl Recipe {
    /// Read a recipe, apply `overrides` (given to every arm), and check every arm's config
    /// loads, so that a mistake in the last arm is found before the first one trains.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Recipe, TrainError> {
        let text = std::fs::read_to_string(path).map_err(|e| cfg_err(path, e))?;
        let mut r: Recipe = toml::from_str(&text).map_err(|e| cfg_err(path, e.message()))?;
        r.set.extend(overrides.iter().cloned());
        if r.arms.is_empty() {
            return Err(cfg_err(path, "no [[arm]]"));
        }
        let mut names = std::collections::HashSet::new();
        for arm in &r.arms {
            if arm.name == "base" || !names.insert(arm.name.clone()) || arm.name.contains(['/', '\\']) || arm.name.is_empty() {
                return Err(cfg_err(path, format!("arm name `{}` is empty, reserved (`base`), repeated or has a slash", arm.name)));
            }
            if arm.best_context && r.flip_rate.is_none() {
                return Err(cfg_err(path, format!("arm `{}` wants best_context but the recipe has no [flip_rate]", arm.name)));
            }
            let cfg = r.arm_config(arm, None, None).map_err(|e| cfg_err(path, format!("arm `{}`: {e}", arm.name)))?;
            if arm.refine.is_some() && !matches!(cfg.method, Method::Sft | Method::ExternalKd) {
                return Err(cfg_err(path, format!("arm `{}`: refine needs an SFT-style method (sft or external_kd)", arm.name)));
            }
        }
        Suite::load(&r.suite)?;
        Ok(r)
    }

    /// An arm's training config with the recipe's base model, output folder and overrides.
    pub fn arm_config(&self, arm: &Arm, best_context: Option<&Path>, refined: Option<&Path>) -> Result<TrainConfig, TrainError> {
        let q = |p: &Path| toml::Value::String(p.display().to_string()).to_string();
        let mut sets = vec![format!("model.path={}", q(&self.model)), format!("train.out_dir={}", q(&self.out_dir.join("train").join(&arm.name)))];
        sets.extend(self.set.iter().cloned());
        sets.extend(arm.set.iter().cloned());
        if let Some(d) = refined {
            sets.push(format!("data.examples={}", q(d)));
        }
        let text = std::fs::read_to_string(&arm.config).map_err(|e| cfg_err(&arm.config, e))?;
        let mut table: toml::Table = toml::from_str(&text).map_err(|e| cfg_err(&arm.config, e.message()))?;
        for o in &sets {
            apply_override(&mut table, o)?;
        }
        // c* replaces whatever harmful context the arm's config had.
        if let Some(c) = best_context {
            if let Some(toml::Value::Table(ctx)) = table.get_mut("context") {
                ctx.remove("harmful");
            }
            apply_override(&mut table, &format!("context.harmful_file={}", q(c)))?;
        }
        TrainConfig::from_table(table, &arm.config.display().to_string())
    }
}

/// Run a recipe (see the module docs); returns the report's Markdown table. Each stage records
/// its inputs ([`opsa_eval::resume`]): a finished stage with the same inputs is skipped, an
/// interrupted one resumes, one made with other inputs is refused, or with `overwrite` done
/// again.
pub fn run_recipe<B: AutodiffBackend>(recipe: &Recipe, control: &RunControl, overwrite: bool, device: &B::Device) -> Result<String, TrainError> {
    let out = &recipe.out_dir;
    std::fs::create_dir_all(out).map_err(|e| cfg_err(out, e))?;
    let suite = Suite::load(&recipe.suite)?;
    let mut judge = opsa_eval::judge::from_spec::<B::InnerBackend>(&recipe.judge, recipe.judge_template.as_deref(), device)?;
    let say = |m: String| {
        if control.progress {
            eprintln!("== {m}");
        }
        tracing::info!("{m}");
    };
    let evaluate = |name: &str, model_dir: &Path, judge: &mut dyn opsa_eval::judge::Judge| -> Result<(), TrainError> {
        let dir = out.join("eval").join(name);
        let opts = LoadOptions::default();
        let inputs = eval_inputs(model_dir, opts.dtype, &suite, judge)?;
        if finished(&dir, &inputs) {
            return Ok(());
        }
        say(format!("evaluating {name} ({})", model_dir.display()));
        let (model, _) = load_model::<B::InnerBackend>(model_dir, &opts, device)?;
        let tok = HfTokenizer::from_dir(model_dir)?;
        run_suite(&model, &tok, &suite, judge, inputs, &dir, overwrite, control.progress)?;
        Ok(())
    };

    // ---- 1. The base model. ----
    evaluate("base", &recipe.model, judge.as_mut())?;

    // ---- 2. The context search. ----
    let best = match &recipe.flip_rate {
        None => None,
        Some(f) => {
            let dir = out.join("flip-rate");
            let best = dir.join("best-context.txt");
            let candidates = opsa_eval::flip::read_candidates(&f.contexts)?;
            let harmful = crate::data::read_prompt_list(&f.prompts)?;
            let benign = match &f.benign_prompts {
                Some(p) => crate::data::read_prompt_list(p)?,
                None => vec![],
            };
            let placement = serde_json::from_value(serde_json::Value::String(f.placement.clone()))
                .map_err(|_| TrainError::Config(format!("flip_rate.placement `{}`: expected system, prepend or append", f.placement)))?;
            let settings = opsa_eval::flip::FlipSettings {
                placement,
                separator: "\n\n".into(),
                max_new_tokens: f.max_new_tokens,
                batch_size: f.batch_size,
                vars: json_map(&f.chat_vars),
            };
            // The results also depend on the candidates and the judge: recorded with them.
            let mut inputs = opsa_eval::flip::flip_inputs(&recipe.model, &harmful, &benign, &settings)?;
            inputs["contexts"] = serde_json::to_value(&candidates).expect("serialises");
            inputs["judge"] = judge.identity();
            if !(best.exists() && opsa_eval::resume::recorded(&dir, &inputs)) {
                say("teacher flip rate over the context pool".into());
                let (model, _) = load_model::<B::InnerBackend>(&recipe.model, &LoadOptions::default(), device)?;
                let tok = HfTokenizer::from_dir(&recipe.model)?;
                opsa_eval::flip::flip_rate(&model, &tok, &candidates, &harmful, &benign, judge.as_mut(), &settings, inputs, &dir, overwrite, control.progress)?;
            }
            Some(best)
        }
    };

    // ---- 3. The arms: (refine), train, evaluate. ----
    let mut runs = vec![out.join("eval").join("base")];
    let mut curves = vec![];
    for arm in &recipe.arms {
        let refined = match &arm.refine {
            None => None,
            Some(r) => {
                let path = out.join("refine").join(format!("{}.jsonl", arm.name));
                if !path.exists() {
                    say(format!("{}: DGR refinement of {}", arm.name, r.data.display()));
                    refine_file::<B::InnerBackend>(recipe, r, &path, judge.as_mut(), control.progress, device)?;
                }
                Some(path)
            }
        };
        let cfg = recipe.arm_config(arm, if arm.best_context { best.as_deref() } else { None }, refined.as_deref())?;
        let run_dir = cfg.train.out_dir.clone();
        let final_dir = run_dir.join("final");
        // Resuming is only right for the same settings (and the same c*, data and base model):
        // a run made with others is refused, or started over with `overwrite`.
        crate::run::claim_run(&cfg, true, overwrite)?;
        if !final_dir.join("config.json").exists() {
            let resume = !crate::checkpoint::list_checkpoints(&run_dir).is_empty();
            say(format!("{}: training ({}{})", arm.name, cfg.method.name(), if resume { ", resuming" } else { "" }));
            let done = crate::method::train::<B>(&cfg, resume, control, device)?;
            if done != final_dir {
                return Err(TrainError::Interrupted(format!("arm {} stopped early; run the recipe again to continue", arm.name)));
            }
        }
        evaluate(&arm.name, &final_dir, judge.as_mut())?;
        runs.push(out.join("eval").join(&arm.name));
        curves.push(run_dir);
    }

    // ---- 4. The report. ----
    runs.extend(curves);
    let md = opsa_eval::report::report(&runs, &out.join("report"), true)?;
    // The recipe these results come from.
    opsa_eval::resume::write_atomic(&out.join("recipe.toml"), &toml::to_string_pretty(recipe).expect("recipe serialises"))
        .map_err(opsa_eval::suite::EvalError::from)?;
    Ok(md)
}

/// DGR-refine `r.data` with the recipe's base model into `path` (and its summary).
fn refine_file<B: Backend>(
    recipe: &Recipe,
    r: &RefineSection,
    path: &Path,
    judge: &mut dyn opsa_eval::judge::Judge,
    progress: bool,
    device: &B::Device,
) -> Result<(), TrainError> {
    let template = crate::refine::load_template(r.template.as_deref())?;
    let input = crate::refine::RefineInput::read(&r.data)?;
    let (model, _) = load_model::<B>(&recipe.model, &LoadOptions::default(), device)?;
    let tok = HfTokenizer::from_dir(&recipe.model)?;
    let opts = crate::refine::RefineOptions {
        template: &template,
        params: SamplingParams { max_new_tokens: r.max_new_tokens, ..Default::default() },
        batch_size: r.batch_size,
        vars: json_map(&r.chat_vars),
        progress,
    };
    crate::refine::refine_file(&model, &tok, &input, path, judge, &opts)?;
    Ok(())
}
