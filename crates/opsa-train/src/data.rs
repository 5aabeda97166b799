//! Training data: prompts (JSONL with `prompt` or a `messages` conversation, and `label`
//! (`harmful` | `benign`), optionally `category`), SFT examples (JSONL with `prompt` and
//! `response`), their rendering with the model's chat template, packing, and COPSD
//! constitutions.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use opsa_distill::Label;
use opsa_models::{ChatMessage, HfTokenizer, Prompt};
use serde_json::Value;

use crate::TrainError;

#[derive(Debug, Clone, PartialEq)]
pub struct LabelledPrompt {
    /// Plain text or a conversation (see [`opsa_models::prompt`]).
    pub prompt: Prompt,
    pub label: Label,
    /// Harm category (COPSD picks the constitution text by it); absent = the label's name.
    pub category: Option<String>,
}

impl LabelledPrompt {
    pub fn category(&self) -> &str {
        self.category.as_deref().unwrap_or(match self.label {
            Label::Harmful => "harmful",
            Label::Benign => "benign",
        })
    }
}

/// The JSON objects of a JSONL file with their 1-based line numbers (blank lines skipped); a
/// line that is not a JSON object is an error naming file and line.
pub fn read_jsonl(path: &Path) -> Result<Vec<(usize, Value)>, TrainError> {
    opsa_models::prompt::read_jsonl(path).map_err(data_error)
}

fn data_error(e: opsa_models::Error) -> TrainError {
    TrainError::Data(e.to_string())
}

/// Read and check every line (`prompt` or `messages`, see [`opsa_models::prompt`]); the first
/// bad line is an error naming file, line and field.
pub fn read_prompts(path: &Path) -> Result<Vec<LabelledPrompt>, TrainError> {
    let at = |line: usize, msg: String| TrainError::Data(format!("{}:{line}: {msg}", path.display()));
    let mut out = Vec::new();
    for opsa_models::prompt::PromptLine { line: n, prompt, object: v } in opsa_models::prompt::read_prompts(path).map_err(data_error)? {
        let label = match v.get("label").and_then(Value::as_str) {
            Some("harmful") => Label::Harmful,
            Some("benign") => Label::Benign,
            Some(other) => return Err(at(n, format!("label `{other}`: expected `harmful` or `benign`"))),
            None => return Err(at(n, "missing string field `label` (harmful or benign)".into())),
        };
        let category = match v.get("category") {
            None | Some(Value::Null) => None,
            Some(Value::String(c)) if !c.trim().is_empty() => Some(c.clone()),
            Some(_) => return Err(at(n, "`category` must be a non-empty string".into())),
        };
        out.push(LabelledPrompt { prompt, label, category });
    }
    Ok(out)
}

/// Just the prompts of a JSONL file (labels not needed), e.g. for the flip-rate search.
pub fn read_prompt_list(path: &Path) -> Result<Vec<Prompt>, TrainError> {
    Ok(opsa_models::prompt::read_prompts(path).map_err(data_error)?.into_iter().map(|l| l.prompt).collect())
}

/// Every prompt with its context (the teacher's, longer stream) plus `max_new` response tokens
/// must fit the model's context; the first that does not is an error naming the file and prompt.
pub fn check_rollouts_fit(pairs: &[opsa_distill::Pair], max_new: usize, max_pos: usize, path: &Path, context: &str) -> Result<(), TrainError> {
    match pairs.iter().enumerate().find(|(_, p)| p.teacher_prompt.len() + max_new > max_pos) {
        Some((i, p)) => Err(TrainError::Data(format!(
            "{}: prompt {} with its {context} ({} tokens) plus rollout.max_new_tokens ({max_new}) exceeds max_position_embeddings ({max_pos})",
            path.display(),
            i + 1,
            p.teacher_prompt.len(),
        ))),
        None => Ok(()),
    }
}

/// The order prompts are visited in: epoch by epoch, each epoch a seeded permutation.
/// A pure function of `(seed, epoch)`, so a resumed run sees exactly the same batches.
pub fn epoch_order(n: usize, seed: u64, epoch: usize, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng = opsa_generate::SplitMix64::for_row(seed, 0x5EED_0000 + epoch as u64);
        for i in (1..n).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
    }
    order
}

/// The prompts of optimiser step `step` (0-based) with `batch` prompts per step: consecutive
/// slices of the epoch orders, wrapping into the next epoch.
pub fn step_batch(n: usize, batch: usize, step: usize, seed: u64, shuffle: bool) -> Vec<usize> {
    (step * batch..(step + 1) * batch)
        .map(|k| {
            let (epoch, pos) = (k / n, k % n);
            epoch_order(n, seed, epoch, shuffle)[pos]
        })
        .collect()
}

/// One supervised example. `label` is optional (used for per-label metrics only).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub prompt: String,
    pub response: String,
    pub system: Option<String>,
    pub label: Option<Label>,
    /// 1-based line in its file, for error messages.
    pub line: usize,
}

/// Read SFT examples; a row without a non-empty `response` is an error naming file and line.
pub fn read_examples(path: &Path) -> Result<Vec<Example>, TrainError> {
    let at = |line: usize, msg: String| TrainError::Data(format!("{}:{line}: {msg}", path.display()));
    let mut out = Vec::new();
    for (n, v) in read_jsonl(path)? {
        let text = |k: &str| match v.get(k) {
            Some(Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.clone())),
            Some(Value::String(_)) => Err(at(n, format!("`{k}` is empty"))),
            None | Some(Value::Null) => Ok(None),
            Some(_) => Err(at(n, format!("`{k}` must be a string"))),
        };
        let prompt = text("prompt")?.ok_or_else(|| at(n, "missing string field `prompt`".into()))?;
        let response = text("response")?.ok_or_else(|| at(n, "missing string field `response` (an SFT example needs the answer to train on)".into()))?;
        let label = match v.get("label").and_then(Value::as_str) {
            Some("harmful") => Some(Label::Harmful),
            Some("benign") => Some(Label::Benign),
            Some(other) => return Err(at(n, format!("label `{other}`: expected `harmful` or `benign`"))),
            None => None,
        };
        out.push(Example { prompt, response, system: text("system")?, label, line: n });
    }
    if out.is_empty() {
        return Err(TrainError::Data(format!("{}: no examples in the file", path.display())));
    }
    Ok(out)
}

/// An example as token ids: the loss covers `response` only (prompt-masked).
#[derive(Debug, Clone, PartialEq)]
pub struct Tokenized {
    pub prompt: Vec<u32>,
    pub response: Vec<u32>,
    pub label: Option<Label>,
}

impl Tokenized {
    pub fn len(&self) -> usize {
        self.prompt.len() + self.response.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The token ids the chat template closes an assistant turn with (e.g. `<|im_end|>` for
/// Qwen, `<｜end▁of▁sentence｜>` for R1-Distill), up to and including the first EOS id.
pub fn end_of_turn(tok: &HfTokenizer, vars: &serde_json::Map<String, Value>) -> Result<Vec<u32>, TrainError> {
    const MARK: &str = "\u{E000}opsa-response-end\u{E000}";
    let text = tok.apply_chat_template(&[ChatMessage::user("x"), ChatMessage::new("assistant", MARK)], false, vars)?;
    let tail = text.rsplit_once(MARK).map(|(_, t)| t).unwrap_or("");
    let ids = tok.encode(tail, false)?;
    match ids.iter().position(|i| tok.eos_ids().contains(i)) {
        Some(k) => Ok(ids[..=k].to_vec()),
        None => tok
            .eos_ids()
            .first()
            .map(|&e| vec![e])
            .ok_or_else(|| TrainError::Config(format!("{}: the model declares no EOS token to end a response with", tok.dir().display()))),
    }
}

/// Render an example with the chat template as the model would see it at inference: the
/// prompt with the generation prompt, then the response text as the data has it, then the
/// end-of-turn token(s). Where the generation prompt already opens the thinking block
/// (R1-Distill's `<think>\n`) and the response starts with `<think>`, the response's opener is
/// dropped so it is not doubled.
pub fn tokenize_example(tok: &HfTokenizer, vars: &serde_json::Map<String, Value>, eot: &[u32], ex: &Example) -> Result<Tokenized, TrainError> {
    let mut messages = vec![];
    if let Some(s) = &ex.system {
        messages.push(ChatMessage::system(s));
    }
    messages.push(ChatMessage::user(&ex.prompt));
    let prompt_text = tok.apply_chat_template(&messages, true, vars)?;
    let mut response = ex.response.as_str();
    if prompt_text.trim_end().ends_with("<think>") {
        if let Some(rest) = response.trim_start().strip_prefix("<think>") {
            response = rest.strip_prefix('\n').unwrap_or(rest);
        }
    }
    let prompt = tok.encode(&prompt_text, false)?;
    let mut resp = tok.encode(response, false)?;
    resp.extend_from_slice(eot);
    Ok(Tokenized { prompt, response: resp, label: ex.label })
}

/// Group examples into rows for one forward pass. Without packing, one example per row.
/// With packing, first-fit in the given order into rows of at most `pack_len` tokens.
pub fn pack(lengths: &[usize], packing: bool, pack_len: usize) -> Vec<Vec<usize>> {
    if !packing {
        return (0..lengths.len()).map(|i| vec![i]).collect();
    }
    let mut rows: Vec<(usize, Vec<usize>)> = vec![];
    for (i, &n) in lengths.iter().enumerate() {
        match rows.iter_mut().find(|(used, _)| used + n <= pack_len) {
            Some((used, r)) => {
                *used += n;
                r.push(i);
            }
            None => rows.push((n, vec![i])),
        }
    }
    rows.into_iter().map(|(_, r)| r).collect()
}

/// A COPSD constitution: policy text per category, from a TOML file of `category = "text"`.
#[derive(Debug, Clone)]
pub struct Constitution {
    pub path: PathBuf,
    pub texts: BTreeMap<String, String>,
}

impl Constitution {
    pub fn read(path: &Path) -> Result<Self, TrainError> {
        let err = |m: String| TrainError::Config(format!("{}: {m}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let table: toml::Table = toml::from_str(&text).map_err(|e| err(e.message().to_string()))?;
        let mut texts = BTreeMap::new();
        for (k, v) in table {
            match v {
                toml::Value::String(s) if !s.trim().is_empty() => {
                    texts.insert(k, s.trim_end_matches('\n').to_string());
                }
                _ => return Err(err(format!("category `{k}`: expected a non-empty string of policy text"))),
            }
        }
        if texts.is_empty() {
            return Err(err("no categories".into()));
        }
        Ok(Constitution { path: path.to_path_buf(), texts })
    }

    /// Every category the prompts use must have a text: checked before training starts.
    pub fn check(&self, prompts: &[LabelledPrompt], prompts_path: &Path) -> Result<(), TrainError> {
        for (i, p) in prompts.iter().enumerate() {
            if !self.texts.contains_key(p.category()) {
                return Err(TrainError::Config(format!(
                    "{}: no category `{}`, which prompt {} of {} uses (categories: {})",
                    self.path.display(),
                    p.category(),
                    i + 1,
                    prompts_path.display(),
                    self.texts.keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
        }
        Ok(())
    }

    pub fn text(&self, category: &str) -> &str {
        &self.texts[category]
    }
}
