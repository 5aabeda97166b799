//! Evaluation datasets, each read from its real published format into [`Item`]s. A malformed
//! row is an error naming the file and line (CSV: the record's line), never a silent drop.
//!
//! | format | columns / fields | item |
//! |---|---|---|
//! | `jsonl` | `prompt` (or a `messages` conversation, see [`opsa_models::prompt`]), optional `label`, `answer`, `category` | as given |
//! | `strongreject` | CSV `category,source,forbidden_prompt` | harmful |
//! | `harmbench` | CSV `Behavior,FunctionalCategory,SemanticCategory,...,BehaviorID` | harmful; `ContextString` prepended when present |
//! | `xstest` | CSV `id,prompt,type,label,...` (`label` = safe/unsafe) | benign for safe, harmful for unsafe |
//! | `gsm8k` | JSONL `question`, `answer` ending in `#### N` | reasoning, answer N |
//! | `math500` | JSONL `problem`, `answer` | reasoning |

use std::collections::HashMap;
use std::path::Path;

use opsa_models::Prompt;
use serde_json::Value;

/// What an item is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A request that should be refused.
    Harmful,
    /// A request that should be answered (over-refusal sets).
    Benign,
    /// A problem with an exact answer.
    Reasoning,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Item {
    /// Stable id within the dataset (row number unless the data has one).
    pub id: String,
    /// Plain text, or a conversation (`jsonl` format only).
    pub prompt: Prompt,
    pub kind: Kind,
    /// Reference answer (reasoning sets).
    pub answer: Option<String>,
    pub category: Option<String>,
}

/// `file:line: message`, or `file: message` when it is about the whole file (`line` 0).
#[derive(Debug, thiserror::Error)]
#[error("{file}{}: {msg}", if *line > 0 { format!(":{line}") } else { String::new() })]
pub struct DataError {
    pub file: String,
    pub line: usize,
    pub msg: String,
}

fn err(path: &Path, line: usize, msg: impl Into<String>) -> DataError {
    DataError { file: path.display().to_string(), line, msg: msg.into() }
}

/// The dataset formats [`load`] reads.
pub const FORMATS: &[&str] = &["jsonl", "strongreject", "harmbench", "xstest", "gsm8k", "math500"];

/// Read a dataset of the given format.
pub fn load(format: &str, path: &Path) -> Result<Vec<Item>, DataError> {
    let items = match format {
        "jsonl" => jsonl(path, |v, line| {
            let prompt = Prompt::from_object(v, "prompt").map_err(|m| err(path, line, m))?;
            let kind = match v.get("label").and_then(Value::as_str) {
                Some("harmful") | Some("unsafe") => Kind::Harmful,
                Some("benign") | Some("safe") => Kind::Benign,
                Some(other) => return Err(err(path, line, format!("label `{other}`: expected harmful or benign"))),
                None if v.get("answer").is_some() => Kind::Reasoning,
                None => return Err(err(path, line, "give a `label` (harmful/benign) or an `answer`")),
            };
            Ok(Item { id: String::new(), prompt, kind, answer: answer_of(v), category: string(v, "category") })
        })?,
        "gsm8k" => jsonl(path, |v, line| {
            let prompt = string(v, "question").ok_or_else(|| err(path, line, "expected a string field `question`"))?;
            let full = string(v, "answer").ok_or_else(|| err(path, line, "expected a string field `answer`"))?;
            let answer = full
                .rsplit_once("####")
                .map(|(_, a)| a.trim().to_string())
                .ok_or_else(|| err(path, line, "`answer` does not end in `#### N`"))?;
            Ok(Item { id: String::new(), prompt: prompt.into(), kind: Kind::Reasoning, answer: Some(answer), category: None })
        })?,
        "math500" => jsonl(path, |v, line| {
            let prompt = string(v, "problem").ok_or_else(|| err(path, line, "expected a string field `problem`"))?;
            let answer = answer_of(v).ok_or_else(|| err(path, line, "expected a field `answer`"))?;
            let id = string(v, "unique_id").unwrap_or_default();
            Ok(Item { id, prompt: prompt.into(), kind: Kind::Reasoning, answer: Some(answer), category: string(v, "subject") })
        })?,
        "strongreject" => csv_rows(path, &["category", "source", "forbidden_prompt"], |r, _| {
            Ok(Item { id: String::new(), prompt: r["forbidden_prompt"].clone().into(), kind: Kind::Harmful, answer: None, category: Some(r["category"].clone()) })
        })?,
        "harmbench" => csv_rows(path, &["Behavior", "BehaviorID"], |r, _| {
            let ctx = r.get("ContextString").map(|s| s.trim()).unwrap_or("");
            let prompt = if ctx.is_empty() { r["Behavior"].clone() } else { format!("{ctx}\n\n---\n\n{}", r["Behavior"]) };
            let category = r.get("SemanticCategory").cloned();
            Ok(Item { id: r["BehaviorID"].clone(), prompt: prompt.into(), kind: Kind::Harmful, answer: None, category })
        })?,
        "xstest" => csv_rows(path, &["prompt", "type", "label"], |r, line| {
            let kind = match r["label"].as_str() {
                "safe" => Kind::Benign,
                "unsafe" => Kind::Harmful,
                other => return Err(err(path, line, format!("label `{other}`: expected safe or unsafe"))),
            };
            let id = r.get("id").cloned().unwrap_or_default();
            Ok(Item { id, prompt: r["prompt"].clone().into(), kind, answer: None, category: Some(r["type"].clone()) })
        })?,
        other => return Err(err(path, 0, format!("unknown dataset format `{other}` (expected one of {})", FORMATS.join(", ")))),
    };
    if items.is_empty() {
        return Err(err(path, 0, "no items in the file"));
    }
    Ok(items)
}

fn string(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_string)
}

/// `answer` as text, whether stored as a string or a number.
fn answer_of(v: &Value) -> Option<String> {
    match v.get("answer")? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn jsonl(path: &Path, mut row: impl FnMut(&Value, usize) -> Result<Item, DataError>) -> Result<Vec<Item>, DataError> {
    let objects = opsa_models::prompt::read_jsonl(path).map_err(|e| match e {
        opsa_models::Error::Line { line, msg, .. } => err(path, line, msg),
        other => err(path, 0, other.to_string()),
    })?;
    let mut out = Vec::new();
    for (n, v) in objects {
        let mut item = row(&v, n)?;
        if item.prompt.request().trim().is_empty() {
            return Err(err(path, n, "empty prompt"));
        }
        if item.id.is_empty() {
            item.id = n.to_string();
        }
        out.push(item);
    }
    Ok(out)
}

fn csv_rows(
    path: &Path,
    required: &[&str],
    mut row: impl FnMut(&HashMap<String, String>, usize) -> Result<Item, DataError>,
) -> Result<Vec<Item>, DataError> {
    let mut rdr = csv::ReaderBuilder::new().flexible(false).from_path(path).map_err(|e| err(path, 0, e.to_string()))?;
    let headers: Vec<String> = rdr.headers().map_err(|e| err(path, 1, e.to_string()))?.iter().map(str::to_string).collect();
    let missing: Vec<&&str> = required.iter().filter(|c| !headers.iter().any(|h| h == **c)).collect();
    if !missing.is_empty() {
        return Err(err(
            path,
            1,
            format!("missing column(s) {missing:?}; expected at least {required:?}, found {headers:?}"),
        ));
    }
    let mut out = Vec::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| err(path, e.position().map(|p| p.line() as usize).unwrap_or(0), e.to_string()))?;
        let line = rec.position().map(|p| p.line() as usize).unwrap_or(0);
        let map: HashMap<String, String> = headers.iter().cloned().zip(rec.iter().map(str::to_string)).collect();
        let mut item = row(&map, line)?;
        if item.prompt.request().trim().is_empty() {
            return Err(err(path, line, "empty prompt"));
        }
        if item.id.is_empty() {
            item.id = line.to_string();
        }
        out.push(item);
    }
    Ok(out)
}
