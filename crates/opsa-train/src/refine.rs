//! DGR, distribution-grounded refinement (arXiv 2602.02136): the *target model* rewrites each
//! external safety example (reasoning and answer) in its own words, so that SFT on the data
//! pulls it less far from its own distribution. Outputs that fail the format or judge checks
//! fall back to the original example. The summary reports the fallback rate and the
//! distribution gap: mean per-token NLL of the responses under the target model, before and
//! after refinement.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::backend::Backend;
use opsa_distill::Label;
use opsa_eval::judge::Judge;
use opsa_eval::refusal::{classify, Verdict};
use opsa_generate::{generate, score, FinishReason, SamplingParams};
use opsa_models::{CausalLm, ChatMessage, HfTokenizer};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::data::{end_of_turn, tokenize_example, Example};
use crate::TrainError;

/// The built-in rewrite prompt (`configs/refine/dgr-rewrite.txt`).
pub const DEFAULT_TEMPLATE: &str = include_str!("../../../configs/refine/dgr-rewrite.txt");

/// The rewrite template: the file's text, or the built-in one; checked either way.
pub fn load_template(path: Option<&Path>) -> Result<String, TrainError> {
    let template = match path {
        Some(p) => std::fs::read_to_string(p).map_err(|e| TrainError::Config(format!("{}: {e}", p.display())))?,
        None => DEFAULT_TEMPLATE.to_string(),
    };
    check_template(&template, &path.map_or("built-in template".into(), |p| p.display().to_string()))?;
    Ok(template)
}

/// A rewrite template must use `{response}` (or `{reasoning}` and `{answer}`) and `{prompt}`.
pub fn check_template(template: &str, source: &str) -> Result<(), TrainError> {
    if !template.contains("{prompt}") || !(template.contains("{response}") || template.contains("{answer}")) {
        return Err(TrainError::Config(format!(
            "{source}: the rewrite template needs {{prompt}} and {{response}} (or {{reasoning}} and {{answer}})"
        )));
    }
    Ok(())
}

/// `(reasoning, answer)` of a response: the text inside `<think>…</think>` and what follows;
/// without a closed think block, no reasoning and the whole text as the answer.
pub fn split_thinking(response: &str) -> (Option<&str>, &str) {
    match response.split_once("</think>") {
        Some((head, answer)) => {
            let reasoning = head.trim_start().strip_prefix("<think>").unwrap_or(head);
            (Some(reasoning.trim()), answer.trim())
        }
        None => (None, response.trim()),
    }
}

/// The rewrite request for one example.
pub fn render_request(template: &str, ex: &Example) -> String {
    let (reasoning, answer) = split_thinking(&ex.response);
    template
        .replace("{prompt}", &ex.prompt)
        .replace("{response}", &ex.response)
        .replace("{reasoning}", reasoning.unwrap_or(""))
        .replace("{answer}", answer)
}

/// Decide on one rewrite. `output` is the rewritten response (with the thinking opener the
/// generation prompt supplied, if any), `finished` whether it ended with EOS and
/// `judged_harmful` the safety judge's verdict on it. Returns the response to keep and, on
/// fallback, why.
pub fn check_rewrite(original: &Example, output: &str, finished: bool, judged_harmful: Option<bool>) -> Result<String, &'static str> {
    if !finished {
        return Err("truncated");
    }
    // An empty thinking block inserted by the template (thinking disabled) is not content.
    let out = output.trim();
    let out = match out.strip_prefix("<think>").map(str::trim_start).and_then(|r| r.strip_prefix("</think>")) {
        Some(rest) if split_thinking(&original.response).0.is_none() => rest.trim(),
        _ => out,
    };
    if out.is_empty() {
        return Err("empty");
    }
    let (reasoning, answer) = split_thinking(out);
    if split_thinking(&original.response).0.is_some() && (reasoning.is_none_or(str::is_empty) || answer.is_empty()) {
        return Err("format: no reasoning and answer");
    }
    if out.contains("{prompt}") || out.contains("{response}") || out.contains("Answer to rewrite:") {
        return Err("format: echoes the template");
    }
    match original.label {
        Some(Label::Harmful) => match judged_harmful {
            Some(false) => {}
            Some(true) => return Err("judged harmful"),
            None => return Err("judge undecided"),
        },
        Some(Label::Benign) => {
            if classify(out) != Verdict::Compliance {
                return Err("refuses a benign request");
            }
        }
        None => {
            // Unlabelled: the rewrite must keep the original's decision (refuse or help).
            if (classify(&original.response) == Verdict::Refusal) != (classify(out) == Verdict::Refusal) {
                return Err("changes the decision (refusal vs help)");
            }
        }
    }
    Ok(out.to_string())
}

/// What `refine` writes next to the refined JSONL.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RefineSummary {
    pub examples: usize,
    pub refined: usize,
    pub fallback: usize,
    pub fallback_rate: f64,
    pub fallback_reasons: BTreeMap<String, usize>,
    /// Mean per-token NLL (nats) of the responses under the target model: the distribution gap.
    pub nll_before: f64,
    pub nll_after: f64,
    pub judge: String,
}

/// Options of a refinement run.
pub struct RefineOptions<'a> {
    pub template: &'a str,
    pub params: SamplingParams,
    pub batch_size: usize,
    /// Chat-template variables for the rewrite request and for rendering the examples.
    pub vars: serde_json::Map<String, Value>,
    pub progress: bool,
}

/// Refine `examples` with `model`; returns one output row per example (the input row's fields,
/// `response` replaced when refined, plus `refined` and `original_response` or
/// `fallback_reason`) and the summary.
pub fn refine<B: Backend>(
    model: &CausalLm<B>,
    tok: &HfTokenizer,
    examples: &[Example],
    rows: &[serde_json::Map<String, Value>],
    judge: &mut dyn Judge,
    opts: &RefineOptions,
) -> Result<(Vec<serde_json::Map<String, Value>>, RefineSummary), TrainError> {
    let eot = end_of_turn(tok, &opts.vars)?;
    let bar = indicatif::ProgressBar::new(examples.len() as u64)
        .with_style(indicatif::ProgressStyle::with_template("refine {bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}").expect("template"));
    if !opts.progress {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut out_rows = Vec::with_capacity(examples.len());
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let (mut nll_before, mut nll_after, mut tok_before, mut tok_after) = (0.0f64, 0.0f64, 0usize, 0usize);
    for (c, chunk) in examples.chunks(opts.batch_size.max(1)).enumerate() {
        // 1. The target model rewrites each example, prompted with the template.
        let mut prompts = vec![];
        let mut openers = vec![];
        for ex in chunk {
            let text = tok.apply_chat_template(&[ChatMessage::user(&render_request(opts.template, ex))], true, &opts.vars)?;
            // R1-style templates open the thinking block in the generation prompt.
            openers.push(if text.trim_end().ends_with("<think>") { "<think>\n" } else { "" });
            prompts.push(tok.encode(&text, false)?);
        }
        // Requests that do not fit the context are not generated: they fall back.
        let max_pos = model.config.max_position_embeddings;
        let fits: Vec<usize> = (0..chunk.len()).filter(|&k| prompts[k].len() < max_pos).collect();
        let index: Vec<u64> = fits.iter().map(|&k| (c * opts.batch_size + k) as u64).collect();
        let fitting: Vec<Vec<u32>> = fits.iter().map(|&k| prompts[k].clone()).collect();
        let mut gens: Vec<Option<opsa_generate::Generation>> = vec![None; chunk.len()];
        if !fitting.is_empty() {
            for (k, g) in fits.iter().zip(generate(model, &fitting, &index, &opts.params, tok.eos_ids(), Some(tok))?) {
                gens[*k] = Some(g);
            }
        }
        let outputs: Vec<String> = gens.iter().zip(&openers).map(|(g, o)| g.as_ref().map_or(String::new(), |g| format!("{o}{}", g.text))).collect();
        // 2. The judge looks at every rewrite; 3. format and judge checks, else the original.
        let items: Vec<(String, String)> = chunk.iter().zip(&outputs).map(|(ex, o)| (ex.prompt.clone(), o.clone())).collect();
        let verdicts = judge.judge(&items)?;
        for (k, ex) in chunk.iter().enumerate() {
            let row_index = c * opts.batch_size + k;
            let mut row = rows[row_index].clone();
            let decision = match &gens[k] {
                None => Err("request exceeds the context"),
                Some(g) => check_rewrite(ex, &outputs[k], g.finish_reason == FinishReason::Stop, verdicts[k].harmful),
            };
            let kept = match decision {
                Ok(text) => {
                    row.insert("original_response".into(), Value::String(ex.response.clone()));
                    row.insert("response".into(), Value::String(text.clone()));
                    row.insert("refined".into(), Value::Bool(true));
                    Example { response: text, ..ex.clone() }
                }
                Err(why) => {
                    *reasons.entry(why.to_string()).or_default() += 1;
                    row.insert("refined".into(), Value::Bool(false));
                    row.insert("fallback_reason".into(), Value::String(why.into()));
                    ex.clone()
                }
            };
            // 4. The distribution gap: NLL of the response under the target model (a fallback's
            //    is its original's).
            let nll_of = |e: &Example| -> Result<(f64, usize), TrainError> {
                let t = tokenize_example(tok, &opts.vars, &eot, e)?;
                let lp = score(model, &t.prompt, &t.response)?;
                Ok((lp.iter().map(|&x| -(x as f64)).sum(), lp.len()))
            };
            let before = nll_of(ex)?;
            let after = if kept.response == ex.response { before } else { nll_of(&kept)? };
            (nll_before, tok_before) = (nll_before + before.0, tok_before + before.1);
            (nll_after, tok_after) = (nll_after + after.0, tok_after + after.1);
            out_rows.push(row);
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let fallback: usize = reasons.values().sum();
    let summary = RefineSummary {
        examples: examples.len(),
        refined: examples.len() - fallback,
        fallback,
        fallback_rate: fallback as f64 / examples.len().max(1) as f64,
        fallback_reasons: reasons,
        nll_before: nll_before / tok_before.max(1) as f64,
        nll_after: nll_after / tok_after.max(1) as f64,
        judge: judge.name(),
    };
    Ok((out_rows, summary))
}

/// A file to refine: its examples (checked) and its rows as written (carried to the output).
pub struct RefineInput {
    pub examples: Vec<Example>,
    pub rows: Vec<serde_json::Map<String, Value>>,
}

impl RefineInput {
    /// Read and check `data` (before any model is loaded, so bad rows fail fast).
    pub fn read(data: &Path) -> Result<Self, TrainError> {
        Ok(RefineInput { examples: crate::data::read_examples(data)?, rows: read_rows(data)? })
    }
}

/// Refine `input` with `model` and write the refined JSONL to `out` with its summary next to it
/// (see [`write_refined`]).
pub fn refine_file<B: Backend>(
    model: &CausalLm<B>,
    tok: &HfTokenizer,
    input: &RefineInput,
    out: &Path,
    judge: &mut dyn Judge,
    opts: &RefineOptions,
) -> Result<RefineSummary, TrainError> {
    let (out_rows, summary) = refine(model, tok, &input.examples, &input.rows, judge, opts)?;
    write_refined(out, &out_rows, &summary)?;
    Ok(summary)
}

/// The input rows as JSON objects (their other fields are carried to the output).
pub fn read_rows(path: &Path) -> Result<Vec<serde_json::Map<String, Value>>, TrainError> {
    Ok(crate::data::read_jsonl(path)?
        .into_iter()
        .filter_map(|(_, v)| match v {
            Value::Object(m) => Some(m),
            _ => None,
        })
        .collect())
}

/// Write the refined rows to `path` and the summary to `path` with extension `.summary.json`,
/// each under a temporary name first, then renamed (an interruption leaves no half file).
pub fn write_refined(path: &Path, rows: &[serde_json::Map<String, Value>], summary: &RefineSummary) -> Result<(), TrainError> {
    let text: String = rows.iter().map(|r| serde_json::to_string(r).expect("rows serialise") + "\n").collect();
    let summary_path = path.with_extension("summary.json");
    crate::write_atomic(path, text)?;
    crate::write_atomic(&summary_path, serde_json::to_string_pretty(summary).expect("serialises") + "\n")
}
