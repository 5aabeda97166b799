//! Training configs: TOML, every key overridable with `--set section.key=value`, unknown keys
//! rejected, everything validated before any work starts.

use std::path::{Path, PathBuf};

use opsa_distill::{Contexts, Divergence, DivergenceKind, Placement};
use opsa_models::WeightDType;
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize};

use crate::TrainError;

/// The training method. One config schema for all of them; each method reads its sections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// On-policy self-distillation for safety alignment (`[data] prompts`, `[context]`).
    Opsa,
    /// Supervised fine-tuning on (prompt, response) examples (`[data] examples`).
    Sft,
    /// Off-policy self-distillation: the model with the context answers once, a judge filters,
    /// SFT on the kept answers without the context (`[data] prompts`, `[context]`, `[offpolicy]`).
    OffpolicySd,
    /// External-teacher distillation: SFT on external examples, or forward-KL logit
    /// distillation on their tokens when `[kd] teacher` is given (`[data] examples`, `[kd]`).
    ExternalKd,
    /// Constitutional on-policy safe distillation (`[data] prompts`, `[copsd]`).
    Copsd,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Opsa => "opsa",
            Method::Sft => "sft",
            Method::OffpolicySd => "offpolicy_sd",
            Method::ExternalKd => "external_kd",
            Method::Copsd => "copsd",
        }
    }
    fn needs_prompts(self) -> bool {
        matches!(self, Method::Opsa | Method::OffpolicySd | Method::Copsd)
    }
    fn needs_context(self) -> bool {
        matches!(self, Method::Opsa | Method::OffpolicySd)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub method: Method,
    pub model: ModelSection,
    pub data: DataSection,
    #[serde(default)]
    pub context: ContextSection,
    #[serde(default)]
    pub chat: ChatSection,
    #[serde(default)]
    pub divergence: DivergenceSection,
    #[serde(default)]
    pub rollout: RolloutSection,
    pub optim: OptimSection,
    #[serde(default)]
    pub schedule: ScheduleSection,
    pub train: TrainSection,
    #[serde(default)]
    pub offpolicy: OffpolicySection,
    #[serde(default)]
    pub kd: KdSection,
    #[serde(default)]
    pub copsd: CopsdSection,
    /// LoRA (PEFT's conventions): only adapters train; the base stays frozen and is the teacher.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<opsa_models::LoraConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Hugging Face folder of the student; the frozen teacher is its initial weights.
    pub path: PathBuf,
    /// The compute dtype: `f32`, or `bf16` (flex, wgpu, cuda). Trained weights are always held
    /// as f32 master weights with f32 optimiser state; with `bf16` the forward and backward
    /// passes run on bf16 copies of them (mixed precision). Frozen models (teachers) are held in
    /// this dtype.
    #[serde(default, deserialize_with = "model_dtype")]
    pub dtype: WeightDType,
    /// How `final/` and the checkpoints' `model/` folders are written: `auto` (the dtype of the
    /// loaded checkpoint), `f32` or `bf16`. Checkpoints keep the f32 masters besides (`masters/`)
    /// when this is narrower, so resume is exact.
    #[serde(default = "auto_name")]
    pub save_dtype: String,
}

fn auto_name() -> String {
    "auto".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// JSONL with `prompt` and `label` (`harmful` | `benign`) per line, optionally `category`
    /// (opsa, offpolicy_sd, copsd).
    pub prompts: Option<PathBuf>,
    /// JSONL with `prompt` and `response` per line, optionally `label` and `system`
    /// (sft, external_kd). Responses are kept as written, thinking segments included.
    pub examples: Option<PathBuf>,
    /// Shuffle every epoch (seeded by `train.seed`).
    #[serde(default = "yes")]
    pub shuffle: bool,
    /// SFT-style methods: pack several examples into one row (each attends only to itself,
    /// positions restart), instead of padding every example to the longest.
    #[serde(default)]
    pub packing: bool,
    /// Tokens per packed row; 0 = the longest example's length.
    #[serde(default)]
    pub pack_len: usize,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextSection {
    // (placement and separator are also how COPSD places its constitution texts.)
    /// c_h, inline ...
    pub harmful: Option<String>,
    /// ... or read from a file (the whole file, trailing newline removed).
    pub harmful_file: Option<PathBuf>,
    /// c_b, inline ...
    pub benign: Option<String>,
    /// ... or from a file.
    pub benign_file: Option<PathBuf>,
    /// `system`, `prepend` (default) or `append`.
    #[serde(default)]
    pub placement: Placement,
    /// Between context and request when placed inside the user turn.
    #[serde(default = "blank_line")]
    pub separator: String,
}

impl Default for ContextSection {
    fn default() -> Self {
        ContextSection { harmful: None, harmful_file: None, benign: None, benign_file: None, placement: Placement::default(), separator: blank_line() }
    }
}

/// Off-policy self-distillation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OffpolicySection {
    /// Judge of the generated answers: `refusal`, `model:DIR` or `http:URL` (as `opsa eval`).
    /// Harmful prompts keep answers the judge finds safe; benign prompts keep answers that
    /// do not refuse (rule-based detector). Truncated answers are never kept.
    pub judge: String,
    /// Prompt template for model:/http: judges.
    pub judge_template: Option<PathBuf>,
}

impl Default for OffpolicySection {
    fn default() -> Self {
        OffpolicySection { judge: "refusal".into(), judge_template: None }
    }
}

/// External-teacher distillation.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KdSection {
    /// Teacher checkpoint with the student's tokenizer: distil its next-token distributions on
    /// the examples' tokens with `[divergence]` (forward KL for the usual off-policy KD).
    /// Absent: plain SFT on the examples.
    pub teacher: Option<PathBuf>,
}

/// Constitutional OPSD.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CopsdSection {
    /// TOML file of policy texts, one string per category (`weapons = "..."`). A prompt uses
    /// its `category` field, else its label (`harmful` / `benign`) as the category.
    pub constitution: Option<PathBuf>,
    /// Sampled-token reward r_t = clip(log p_T − log p_S, lo, hi) + bonus.
    pub reward_clip: [f64; 2],
    pub bonus: f64,
    /// PPO ratio clip ε.
    pub ppo_clip: f64,
    /// Optimiser updates on each batch of rollouts (1 = strictly on-policy).
    pub ppo_epochs: usize,
    /// Cross-SFT cold start of the teacher: epochs (0 = off) and learning rate.
    pub cold_start_epochs: usize,
    pub cold_start_lr: f64,
    /// Warn when entropy or mean response length falls below this share of its first-step value.
    pub entropy_warn_ratio: f64,
    pub length_warn_ratio: f64,
}

impl Default for CopsdSection {
    /// The COPSD public code's values; cold start off.
    fn default() -> Self {
        CopsdSection {
            constitution: None,
            reward_clip: [-3.0, 5.0],
            bonus: 0.02,
            ppo_clip: 0.2,
            ppo_epochs: 1,
            cold_start_epochs: 0,
            cold_start_lr: 1e-5,
            entropy_warn_ratio: 0.5,
            length_warn_ratio: 0.5,
        }
    }
}

fn blank_line() -> String {
    "\n\n".into()
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatSection {
    /// Extra chat-template variables, e.g. `{ enable_thinking = true }`.
    #[serde(default)]
    pub vars: toml::Table,
}

/// `divergence.kind`: which divergence (its parameters are the section's other keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DivergenceName {
    Forward,
    Reverse,
    Jsd,
    Mixed,
    Sampled,
}

/// A serde enum named by `key` in its error: serde's own message does not say which key it read.
fn keyed<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D, key: &str) -> Result<T, D::Error> {
    let name = String::deserialize(d)?;
    T::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(&name)).map_err(|e| D::Error::custom(format!("{key}: {e}")))
}

fn divergence_kind<'de, D: Deserializer<'de>>(d: D) -> Result<DivergenceName, D::Error> {
    keyed(d, "divergence.kind")
}

fn model_dtype<'de, D: Deserializer<'de>>(d: D) -> Result<WeightDType, D::Error> {
    keyed(d, "model.dtype")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DivergenceSection {
    /// `forward`, `reverse`, `jsd`, `mixed` or `sampled`.
    #[serde(deserialize_with = "divergence_kind")]
    pub kind: DivergenceName,
    /// mixed: weight of forward KL.
    pub alpha: Option<f64>,
    /// jsd: β (0 = forward KL, 1 = reverse KL).
    pub beta: Option<f64>,
    /// Teacher's top-k support, renormalised; 0 = full vocabulary.
    pub top_k: usize,
    pub temperature: f64,
    /// Pointwise clip τ (absent = none).
    pub clip: Option<f64>,
    /// sampled: reward clip range.
    pub reward_clip: [f64; 2],
    /// Positions per chunk of the divergence (bounds its memory).
    pub chunk_size: usize,
}

impl Default for DivergenceSection {
    /// OPSA's: mixed α = 0.5 on the teacher's top-64.
    fn default() -> Self {
        DivergenceSection {
            kind: DivergenceName::Mixed,
            alpha: Some(0.5),
            beta: None,
            top_k: 64,
            temperature: 1.0,
            clip: None,
            reward_clip: [-3.0, 5.0],
            chunk_size: 256,
        }
    }
}

impl DivergenceSection {
    pub fn divergence(&self) -> Result<Divergence, TrainError> {
        let need = |v: Option<f64>, what: &str, kind: &str| v.ok_or_else(|| TrainError::Config(format!("divergence.{what} is required for kind `{kind}`")));
        let kind = match self.kind {
            DivergenceName::Forward => DivergenceKind::Forward,
            DivergenceName::Reverse => DivergenceKind::Reverse,
            DivergenceName::Jsd => DivergenceKind::Jsd { beta: need(self.beta, "beta", "jsd")? },
            DivergenceName::Mixed => DivergenceKind::Mixed { alpha: need(self.alpha, "alpha", "mixed")? },
            DivergenceName::Sampled => DivergenceKind::Sampled { lo: self.reward_clip[0], hi: self.reward_clip[1] },
        };
        let d = Divergence { kind, top_k: (self.top_k > 0).then_some(self.top_k), temperature: self.temperature, clip: self.clip };
        d.validate().map_err(|e| TrainError::Config(format!("divergence: {e}")))?;
        Ok(d)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutSection {
    /// Rollouts per prompt.
    pub n: usize,
    pub temperature: f32,
    pub top_p: f32,
    /// 0 = off.
    pub top_k: usize,
    pub max_new_tokens: usize,
    /// Prompts generated together.
    pub batch_size: usize,
}

impl RolloutSection {
    /// The sampling settings of these rollouts, with `seed`.
    pub fn params(&self, seed: u64) -> opsa_generate::SamplingParams {
        opsa_generate::SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            max_new_tokens: self.max_new_tokens,
            seed,
            stop_strings: vec![],
        }
    }
}

/// The rollout seed of optimiser step `step` (0-based): a pure function of `(seed, step)`, so a
/// resumed run samples exactly what the uninterrupted one would have.
pub fn step_seed(seed: u64, step: usize) -> u64 {
    seed ^ (step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

impl Default for RolloutSection {
    /// The paper's: one rollout per prompt at temperature 1.0.
    fn default() -> Self {
        RolloutSection { n: 1, temperature: 1.0, top_p: 1.0, top_k: 0, max_new_tokens: 512, batch_size: 16 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimSection {
    pub lr: f64,
    /// AdamW, with PyTorch's defaults.
    #[serde(default = "beta1")]
    pub beta1: f32,
    #[serde(default = "beta2")]
    pub beta2: f32,
    #[serde(default = "eps")]
    pub eps: f32,
    #[serde(default = "wd")]
    pub weight_decay: f32,
    /// Global gradient-norm clip (torch's clip_grad_norm_ over all parameters); 0 = off.
    #[serde(default = "clip1")]
    pub grad_clip: f64,
}

fn beta1() -> f32 {
    0.9
}
fn beta2() -> f32 {
    0.999
}
fn eps() -> f32 {
    1e-8
}
fn wd() -> f32 {
    0.01
}
fn clip1() -> f64 {
    1.0
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleSection {
    /// Share of the steps with linear warmup from 0.
    pub warmup_ratio: f64,
    /// Cosine decays to `lr * min_lr_ratio`.
    pub min_lr_ratio: f64,
}

impl Default for ScheduleSection {
    fn default() -> Self {
        ScheduleSection { warmup_ratio: 0.1, min_lr_ratio: 0.0 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Output folder: config.toml, metrics.jsonl, checkpoints/, final/.
    pub out_dir: PathBuf,
    /// Prompts per optimiser step.
    pub batch_size: usize,
    /// Rollouts per forward/backward pass (gradient accumulation inside a step).
    pub micro_batch_size: usize,
    #[serde(default = "one")]
    pub epochs: usize,
    /// Total optimiser steps; default: epochs × ceil(prompts / batch_size).
    pub steps: Option<usize>,
    /// Checkpoint every N steps (and at the end); 0 = only at the end.
    #[serde(default)]
    pub save_every: usize,
    /// Checkpoints kept (oldest removed first).
    #[serde(default = "two")]
    pub keep_checkpoints: usize,
    #[serde(default)]
    pub seed: u64,
    /// Activation recompute: keep only each layer's input in the forward pass and recompute one
    /// layer at a time in the backward pass (peak activation memory of one layer, about one
    /// more forward pass of compute). Gradients are unchanged.
    #[serde(default)]
    pub recompute: bool,
}

fn one() -> usize {
    1
}
fn two() -> usize {
    2
}

impl TrainConfig {
    /// Read a TOML file, apply `--set` overrides, validate.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, TrainError> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
        let mut table: toml::Table = toml::from_str(&text).map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        Self::from_table(table, &path.display().to_string())
    }

    pub fn from_table(table: toml::Table, source: &str) -> Result<Self, TrainError> {
        let cfg: TrainConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| TrainError::Config(format!("{source}: {}", e.message())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::Config(m));
        if !(self.optim.lr > 0.0) || !self.optim.lr.is_finite() {
            return bad(format!("optim.lr must be > 0, got {}", self.optim.lr));
        }
        if !(0.0..1.0).contains(&self.optim.beta1) || !(0.0..1.0).contains(&self.optim.beta2) {
            return bad("optim.beta1 and optim.beta2 must lie in [0, 1)".into());
        }
        if !(self.optim.eps > 0.0) || self.optim.weight_decay < 0.0 || self.optim.grad_clip < 0.0 {
            return bad("optim.eps must be > 0; weight_decay and grad_clip >= 0".into());
        }
        if !(0.0..=1.0).contains(&self.schedule.warmup_ratio) || !(0.0..=1.0).contains(&self.schedule.min_lr_ratio) {
            return bad("schedule.warmup_ratio and schedule.min_lr_ratio must lie in [0, 1]".into());
        }
        let t = &self.train;
        if t.batch_size == 0 || t.micro_batch_size == 0 || t.epochs == 0 || t.steps == Some(0) {
            return bad("train.batch_size, train.micro_batch_size, train.epochs and train.steps must be positive".into());
        }
        let r = &self.rollout;
        if r.n == 0 || r.max_new_tokens == 0 || r.batch_size == 0 {
            return bad("rollout.n, rollout.max_new_tokens and rollout.batch_size must be positive".into());
        }
        if !(r.top_p > 0.0 && r.top_p <= 1.0) || !(r.temperature >= 0.0) {
            return bad("rollout.top_p must lie in (0, 1] and rollout.temperature be >= 0".into());
        }
        if self.divergence.chunk_size == 0 {
            return bad("divergence.chunk_size must be positive".into());
        }
        self.divergence.divergence()?;
        if self.model.save_dtype != "auto" {
            WeightDType::parse(&self.model.save_dtype)
                .map_err(|e| TrainError::Config(format!("model.save_dtype: {e}; or `auto` (the dtype of the loaded checkpoint)")))?;
        }
        let m = self.method.name();
        let c = &self.context;
        if self.method.needs_context() {
            for (what, inline, file) in [("harmful", &c.harmful, &c.harmful_file), ("benign", &c.benign, &c.benign_file)] {
                if inline.is_some() == file.is_some() {
                    return bad(format!("context: give exactly one of `{what}` and `{what}_file` (method {m})"));
                }
            }
        }
        if self.method.needs_prompts() && self.data.prompts.is_none() {
            return bad(format!("method {m} needs data.prompts (a JSONL of prompts with labels)"));
        }
        if matches!(self.method, Method::Sft | Method::ExternalKd) && self.data.examples.is_none() {
            return bad(format!("method {m} needs data.examples (a JSONL of prompt/response pairs)"));
        }
        if let Some(l) = &self.lora {
            l.check(|k| format!("lora.{k}")).map_err(TrainError::Config)?;
            if l.dropout > 0.0 && self.train.recompute {
                return bad("lora.dropout > 0 with train.recompute = true: the recomputed layers would draw other dropout masks; set one of them off".into());
            }
            if self.method == Method::Copsd && self.copsd.cold_start_epochs > 0 {
                return bad("copsd.cold_start_epochs > 0 with [lora]: the cold-started teacher would be a second, fully trained model; with LoRA the teacher is the base (set copsd.cold_start_epochs = 0)".into());
            }
        }
        if self.method == Method::Copsd {
            let p = &self.copsd;
            if p.constitution.is_none() {
                return bad("method copsd needs copsd.constitution (a TOML file of per-category policy texts)".into());
            }
            if !(p.reward_clip[0] < p.reward_clip[1]) || !p.bonus.is_finite() {
                return bad(format!("copsd.reward_clip [{}, {}] is empty or copsd.bonus is not finite", p.reward_clip[0], p.reward_clip[1]));
            }
            if !(p.ppo_clip > 0.0) || p.ppo_epochs == 0 || !(p.cold_start_lr > 0.0) {
                return bad("copsd.ppo_clip, copsd.ppo_epochs and copsd.cold_start_lr must be positive".into());
            }
            if self.rollout.n < 2 {
                return bad("method copsd normalises advantages over a prompt's group: rollout.n (G) must be at least 2".into());
            }
        }
        Ok(())
    }

    /// The compute dtype (`model.dtype`).
    pub fn dtype(&self) -> WeightDType {
        self.model.dtype
    }

    /// Optimiser steps of a run over `n` items: `train.steps`, else `train.epochs` × ⌈n /
    /// `train.batch_size`⌉.
    pub fn total_steps(&self, n: usize) -> usize {
        self.train.steps.unwrap_or(self.train.epochs * n.div_ceil(self.train.batch_size))
    }

    /// The OPSA contexts (`[context]`, inline or read from their files).
    pub fn contexts(&self) -> Result<Contexts, TrainError> {
        let c = &self.context;
        Ok(Contexts {
            harmful: read_context(&c.harmful, &c.harmful_file)?,
            benign: read_context(&c.benign, &c.benign_file)?,
            placement: c.placement,
            separator: c.separator.clone(),
        })
    }

    /// The dtype `final/` and checkpoint model folders are written in (`model.save_dtype`;
    /// `auto`: the dtype `config.json` of `model.path` records, else the compute dtype).
    pub fn save_dtype(&self) -> WeightDType {
        match self.model.save_dtype.as_str() {
            "auto" => opsa_models::ModelConfig::from_file(&self.model.path.join("config.json"))
                .ok()
                .and_then(|c| opsa_models::checkpoint::config_dtype(&c))
                .unwrap_or(self.dtype()),
            s => WeightDType::parse(s).expect("validated"),
        }
    }

    /// The template variables as JSON.
    pub fn chat_vars(&self) -> serde_json::Map<String, serde_json::Value> {
        json_map(&self.chat.vars)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }
}

/// A context given inline, or read from a file (the whole file, one trailing newline removed).
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

/// A TOML table (e.g. chat-template variables) as a JSON object.
pub fn json_map(t: &toml::Table) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::to_value(t) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => Default::default(),
    }
}

/// `a.b.c=value`: value parsed as a TOML value when it parses (numbers, booleans, arrays,
/// quoted strings), else taken as a bare string.
pub fn apply_override(table: &mut toml::Table, kv: &str) -> Result<(), TrainError> {
    let (key, raw) = kv.split_once('=').ok_or_else(|| TrainError::Config(format!("--set `{kv}`: expected KEY=VALUE")))?;
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.trim().split('.').collect();
    let mut cur = table;
    for p in &parts[..parts.len() - 1] {
        let entry = cur.entry(p.to_string()).or_insert_with(|| toml::Value::Table(Default::default()));
        cur = entry.as_table_mut().ok_or_else(|| TrainError::Config(format!("--set `{kv}`: `{p}` is not a section")))?;
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}
