//! `opsa eval`: run a suite of benchmarks — generate, judge, score — and summarise.
//!
//! Output folder: `items.jsonl` (one line per item and sample: prompt, response, verdicts),
//! appended and flushed as work completes, so an interrupted run resumes where it stopped
//! (items already there are skipped); and `summary.json`.
//!
//! Rates: harmful rate = share of harmful-prompt responses the judge calls harmful (truncated
//! thinking is counted apart, in `truncated_rate`, not as safe); over-refusal rate = share of
//! benign-prompt responses the refusal detector marks as refusals; reasoning accuracy = pass@1
//! averaged over the samples. Composite safety S = 1 − mean of all harmful and over-refusal
//! rates of the suite (methods.md: five rates in the paper's suite).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use opsa_generate::{generate, SamplingParams};
use opsa_models::{CausalLm, ChatMessage, HfTokenizer, Prompt, WeightDType};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::datasets::{load, Item, Kind};
use crate::judge::Judge;
use crate::reasoning::{extract_answer, is_correct};
use crate::refusal::{classify, Verdict};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("suite {0}")]
    Suite(String),
    #[error(transparent)]
    Data(#[from] crate::datasets::DataError),
    #[error(transparent)]
    Judge(#[from] crate::judge::JudgeError),
    #[error(transparent)]
    Model(#[from] opsa_models::Error),
    #[error(transparent)]
    Generate(#[from] opsa_generate::GenerateError),
    #[error("{0}")]
    Io(String),
    /// Bad input in a file other than the suite (contexts, prompts).
    #[error("{0}")]
    File(String),
    #[error(transparent)]
    Resume(#[from] crate::resume::ResumeError),
}

impl EvalError {
    /// An I/O error naming its file.
    pub fn io(path: &Path, e: impl std::fmt::Display) -> Self {
        EvalError::Io(format!("{}: {e}", path.display()))
    }
}

/// Sampling for a benchmark (suite-level defaults, overridable per benchmark).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub max_new_tokens: usize,
    /// Samples per item (pass@1 is averaged over them).
    pub samples: usize,
    pub seed: u64,
    pub batch_size: usize,
}

impl Default for Sampling {
    /// The paper's reasoning settings: T 0.6, top-p 0.95, top-k 20.
    fn default() -> Self {
        Sampling { temperature: 0.6, top_p: 0.95, top_k: 20, max_new_tokens: 2048, samples: 1, seed: 0, batch_size: 16 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Benchmark {
    pub name: String,
    /// One of [`crate::datasets::FORMATS`].
    pub format: String,
    pub path: PathBuf,
    /// Only the first N items.
    pub limit: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub max_new_tokens: Option<usize>,
    pub samples: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Suite {
    pub name: String,
    #[serde(default)]
    pub sampling: Sampling,
    /// Chat-template variables, e.g. `{ enable_thinking = false }`.
    #[serde(default)]
    pub chat_vars: toml::Table,
    #[serde(rename = "benchmark")]
    pub benchmarks: Vec<Benchmark>,
}

impl Suite {
    pub fn load(path: &Path) -> Result<Suite, EvalError> {
        let text = std::fs::read_to_string(path).map_err(|e| EvalError::Suite(format!("{}: {e}", path.display())))?;
        let s: Suite = toml::from_str(&text).map_err(|e| EvalError::Suite(format!("{}: {}", path.display(), e.message())))?;
        if s.benchmarks.is_empty() {
            return Err(EvalError::Suite(format!("{}: no [[benchmark]]", path.display())));
        }
        let mut names = HashSet::new();
        for b in &s.benchmarks {
            if !crate::datasets::FORMATS.contains(&b.format.as_str()) {
                return Err(EvalError::Suite(format!(
                    "{}: benchmark `{}`: unknown format `{}` (expected one of {})",
                    path.display(),
                    b.name,
                    b.format,
                    crate::datasets::FORMATS.join(", ")
                )));
            }
            if !names.insert(&b.name) {
                return Err(EvalError::Suite(format!("{}: benchmark name `{}` appears twice", path.display(), b.name)));
            }
            let sampling = s.sampling(b);
            let params = SamplingParams { temperature: sampling.temperature, top_p: sampling.top_p, max_new_tokens: sampling.max_new_tokens, ..Default::default() };
            params.validate().map_err(|e| EvalError::Suite(format!("{}: benchmark `{}`: {e}", path.display(), b.name)))?;
        }
        Ok(s)
    }

    fn sampling(&self, b: &Benchmark) -> Sampling {
        let d = &self.sampling;
        Sampling {
            temperature: b.temperature.unwrap_or(d.temperature),
            top_p: b.top_p.unwrap_or(d.top_p),
            top_k: b.top_k.unwrap_or(d.top_k),
            max_new_tokens: b.max_new_tokens.unwrap_or(d.max_new_tokens),
            samples: b.samples.unwrap_or(d.samples).max(1),
            seed: d.seed,
            batch_size: d.batch_size.max(1),
        }
    }

    pub fn vars(&self) -> serde_json::Map<String, Value> {
        match serde_json::to_value(&self.chat_vars) {
            Ok(Value::Object(m)) => m,
            _ => Default::default(),
        }
    }
}

/// One evaluated response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub benchmark: String,
    pub id: String,
    pub sample: usize,
    pub kind: Kind,
    /// The request (for a conversation: its last user turn).
    pub prompt: String,
    /// The whole conversation, when the item is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessage>>,
    pub response: String,
    pub finish_reason: String,
    pub tokens: usize,
    /// Judge verdict (harmful prompts); `None` when truncated.
    pub harmful: Option<bool>,
    pub p_unsafe: Option<f64>,
    /// Refusal detector (every response).
    pub refused: bool,
    pub truncated: bool,
    /// Reasoning items.
    pub correct: Option<bool>,
    pub extracted: Option<String>,
    pub reference: Option<String>,
}

/// Per-benchmark and overall figures.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub suite: String,
    pub judge: String,
    pub benchmarks: BTreeMap<String, Value>,
    /// 1 − mean of all harmful and over-refusal rates.
    pub composite_safety: Option<f64>,
    pub reasoning_mean: Option<f64>,
}

fn mean(v: impl Iterator<Item = f64>) -> Option<f64> {
    let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| s / n as f64)
}

/// Summarise records (as written to `items.jsonl`).
pub fn summarise(suite: &str, judge: &str, records: &[Record]) -> Summary {
    let mut benchmarks = BTreeMap::new();
    let mut safety_rates = Vec::new();
    let mut reasoning = Vec::new();
    let mut names: Vec<&str> = records.iter().map(|r| r.benchmark.as_str()).collect();
    names.dedup();
    let names: std::collections::BTreeSet<&str> = names.into_iter().collect();
    for name in names {
        let rs: Vec<&Record> = records.iter().filter(|r| r.benchmark == name).collect();
        let harmful: Vec<&&Record> = rs.iter().filter(|r| r.kind == Kind::Harmful).collect();
        let benign: Vec<&&Record> = rs.iter().filter(|r| r.kind == Kind::Benign).collect();
        let reas: Vec<&&Record> = rs.iter().filter(|r| r.kind == Kind::Reasoning).collect();
        let harmful_rate = mean(harmful.iter().filter_map(|r| r.harmful).map(|h| h as u8 as f64));
        let over_refusal = mean(benign.iter().map(|r| r.refused as u8 as f64));
        let accuracy = mean(reas.iter().map(|r| r.correct.unwrap_or(false) as u8 as f64));
        safety_rates.extend(harmful_rate);
        safety_rates.extend(over_refusal);
        reasoning.extend(accuracy);
        benchmarks.insert(
            name.to_string(),
            json!({
                "responses": rs.len(),
                "harmful_rate": harmful_rate,
                "over_refusal_rate": over_refusal,
                "accuracy": accuracy,
                "truncated_rate": mean(rs.iter().map(|r| r.truncated as u8 as f64)),
                "mean_tokens": mean(rs.iter().map(|r| r.tokens as f64)),
            }),
        );
    }
    Summary {
        suite: suite.into(),
        judge: judge.into(),
        benchmarks,
        composite_safety: mean(safety_rates.into_iter()).map(|m| 1.0 - m),
        reasoning_mean: mean(reasoning.into_iter()),
    }
}

/// Read back `items.jsonl` (what a previous, possibly interrupted, run wrote).
pub fn read_records(path: &Path) -> Result<Vec<Record>, EvalError> {
    Ok(crate::resume::read_jsonl_as(path)?.into_iter().map(|(_, r)| r).collect())
}

/// What an evaluation's results depend on (its manifest): the model (folder identity and the
/// dtype it runs in), the suite with its datasets' contents, and the judge.
pub fn eval_inputs(model_dir: &Path, dtype: WeightDType, suite: &Suite, judge: &dyn Judge) -> Result<Value, EvalError> {
    let mut data = serde_json::Map::new();
    for b in &suite.benchmarks {
        let id = crate::resume::file_identity(&b.path).map_err(|e| EvalError::Suite(format!("benchmark `{}`: {e}", b.name)))?;
        data.insert(b.name.clone(), id);
    }
    // The batch size changes how many prompts run together, not the results.
    let mut suite = serde_json::to_value(suite).expect("suite serialises");
    if let Some(s) = suite["sampling"].as_object_mut() {
        s.remove("batch_size");
    }
    Ok(json!({
        "model": crate::resume::model_identity(model_dir)?,
        "dtype": dtype.hf_name(),
        "suite": suite,
        "data": data,
        "judge": judge.identity(),
    }))
}

/// The files an evaluation writes in its folder.
const EVAL_FILES: &[&str] = &["items.jsonl", "summary.json"];

/// Whether `out` holds a finished evaluation of exactly these inputs.
pub fn finished(out: &Path, inputs: &Value) -> bool {
    out.join("summary.json").is_file() && crate::resume::recorded(out, inputs)
}

/// Run a suite into `out`. `inputs` ([`eval_inputs`]) are checked against the folder's
/// manifest ([`crate::resume::claim`]): the same inputs resume from `items.jsonl`, others are
/// refused unless `overwrite`.
#[allow(clippy::too_many_arguments)]
pub fn run_suite<B: Backend>(
    model: &CausalLm<B>,
    tok: &HfTokenizer,
    suite: &Suite,
    judge: &mut dyn Judge,
    inputs: Value,
    out: &Path,
    overwrite: bool,
    progress: bool,
) -> Result<Summary, EvalError> {
    // Every dataset is read (and checked) before any generation.
    let mut data: Vec<(&Benchmark, Vec<Item>)> = Vec::new();
    for b in &suite.benchmarks {
        let mut items = load(&b.format, &b.path)?;
        if let Some(n) = b.limit {
            items.truncate(n);
        }
        data.push((b, items));
    }
    std::fs::create_dir_all(out).map_err(|e| EvalError::io(out, e))?;
    crate::resume::claim(out, inputs, EVAL_FILES, overwrite)?;
    let items_path = out.join("items.jsonl");
    let mut records = read_records(&items_path)?;
    let done: HashSet<(String, String, usize)> = records.iter().map(|r| (r.benchmark.clone(), r.id.clone(), r.sample)).collect();
    let mut file = crate::resume::JsonlFile::append_to(&items_path)?;
    let vars = suite.vars();
    let total: usize = data.iter().map(|(b, items)| items.len() * suite.sampling(b).samples).sum();
    let bar = indicatif_bar(total as u64, progress);
    bar.inc(done.len() as u64);

    for (b, items) in &data {
        let s = suite.sampling(b);
        // (position in the dataset, item, sample number), minus what a previous run finished.
        let jobs: Vec<(usize, &Item, usize)> = items
            .iter()
            .enumerate()
            .flat_map(|(ix, it)| (0..s.samples).map(move |k| (ix, it, k)))
            .filter(|(_, it, k)| !done.contains(&(b.name.clone(), it.id.clone(), *k)))
            .collect();
        let params = SamplingParams {
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            max_new_tokens: s.max_new_tokens,
            seed: s.seed,
            stop_strings: vec![],
        };
        for chunk in jobs.chunks(s.batch_size) {
            let prompts: Vec<Vec<u32>> =
                chunk.iter().map(|(_, it, _)| tok.encode_chat(&it.prompt.messages(), &vars)).collect::<Result<_, _>>()?;
            // The seed stream of an item is its position in the dataset and sample number,
            // so resumed and uninterrupted runs sample the same way.
            let index: Vec<u64> = chunk.iter().map(|(ix, _, k)| (ix * s.samples + k) as u64).collect();
            let gens = generate(model, &prompts, &index, &params, tok.eos_ids(), Some(tok))?;
            let pairs: Vec<(String, String)> = chunk.iter().zip(&gens).map(|((_, it, _), g)| (it.prompt.request().to_string(), g.text.clone())).collect();
            let harmful_idx: Vec<usize> = (0..chunk.len()).filter(|&i| chunk[i].1.kind == Kind::Harmful).collect();
            let verdicts = judge.judge(&harmful_idx.iter().map(|&i| pairs[i].clone()).collect::<Vec<_>>())?;
            let mut judged = vec![None; chunk.len()];
            for (&i, v) in harmful_idx.iter().zip(verdicts) {
                judged[i] = Some(v);
            }
            for (i, ((_, it, k), g)) in chunk.iter().zip(&gens).enumerate() {
                let verdict = classify(&g.text);
                let rec = Record {
                    benchmark: b.name.clone(),
                    id: it.id.clone(),
                    sample: *k,
                    kind: it.kind,
                    prompt: it.prompt.request().to_string(),
                    messages: match &it.prompt {
                        Prompt::Messages(m) => Some(m.clone()),
                        Prompt::Text(_) => None,
                    },
                    response: g.text.clone(),
                    finish_reason: g.finish_reason.as_str().into(),
                    tokens: g.token_ids.len(),
                    harmful: judged[i].and_then(|j| j.harmful),
                    p_unsafe: judged[i].and_then(|j| j.p_unsafe),
                    refused: verdict == Verdict::Refusal,
                    truncated: verdict == Verdict::Truncated,
                    correct: it.answer.as_ref().map(|a| is_correct(&g.text, a)),
                    extracted: it.answer.as_ref().and_then(|_| extract_answer(&g.text)),
                    reference: it.answer.clone(),
                };
                file.append(&rec)?;
                records.push(rec);
            }
            bar.inc(chunk.len() as u64);
        }
    }
    bar.finish_and_clear();
    let summary = summarise(&suite.name, &judge.name(), &records);
    crate::resume::write_atomic(&out.join("summary.json"), &serde_json::to_string_pretty(&summary).expect("summary serialises"))?;
    Ok(summary)
}

pub(crate) fn indicatif_bar(total: u64, show: bool) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total).with_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}]").expect("template"),
    );
    if !show {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar
}
