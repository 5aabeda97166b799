//! Training prompts: JSONL with `prompt` and `label` (`harmful` | `benign`) on every line.

use std::io::BufRead;
use std::path::Path;

use opsa_distill::Label;
use serde_json::Value;

use crate::TrainError;

#[derive(Debug, Clone, PartialEq)]
pub struct LabelledPrompt {
    pub prompt: String,
    pub label: Label,
}

/// Read and check every line; the first bad line is an error naming file and line.
pub fn read_prompts(path: &Path) -> Result<Vec<LabelledPrompt>, TrainError> {
    let at = |line: usize, msg: String| TrainError::Data(format!("{}:{line}: {msg}", path.display()));
    let f = std::fs::File::open(path).map_err(|e| TrainError::Data(format!("{}: {e}", path.display())))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| at(n, e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line).map_err(|e| at(n, format!("not a JSON object: {e}")))?;
        let prompt = match v.get("prompt") {
            Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
            Some(Value::String(_)) => return Err(at(n, "`prompt` is empty".into())),
            _ => return Err(at(n, "expected a string field `prompt`".into())),
        };
        let label = match v.get("label").and_then(Value::as_str) {
            Some("harmful") => Label::Harmful,
            Some("benign") => Label::Benign,
            Some(other) => return Err(at(n, format!("label `{other}`: expected `harmful` or `benign`"))),
            None => return Err(at(n, "missing string field `label` (harmful or benign)".into())),
        };
        out.push(LabelledPrompt { prompt, label });
    }
    if out.is_empty() {
        return Err(TrainError::Data(format!("{}: no prompts in the file", path.display())));
    }
    Ok(out)
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
