//! `opsa analyze-kl`: where the teacher (with its context) and the student disagree, token by
//! token, on the student's own responses: the mean divergence by response position, and the
//! tokens with the largest total divergence (the paper finds it concentrated in the first ~10
//! tokens, on compliance openers such as "Sure" / "Here").

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::backend::Backend;
use opsa_distill::{response_divergence, Contexts, Divergence, Label, Pair};
use opsa_generate::{generate, SamplingParams};
use opsa_models::{CausalLm, HfTokenizer, Prompt};
use serde::Deserialize;
use serde_json::json;

use crate::plot::{lines, Chart, Series};
use crate::suite::{indicatif_bar, EvalError};

/// What the cached responses depend on (the manifest of an analysis folder).
#[allow(clippy::too_many_arguments)]
pub fn kl_inputs(
    student_dir: &Path,
    teacher_dir: &Path,
    contexts: &Contexts,
    prompts: &[(Prompt, Label)],
    vars: &serde_json::Map<String, serde_json::Value>,
    div: &Divergence,
    params: &SamplingParams,
) -> Result<serde_json::Value, EvalError> {
    let prompts: Vec<(serde_json::Value, bool)> = prompts.iter().map(|(p, l)| (p.to_json(), *l == Label::Benign)).collect();
    Ok(json!({
        "student": crate::resume::model_identity(student_dir)?,
        "teacher": crate::resume::model_identity(teacher_dir)?,
        "contexts": [contexts.harmful, contexts.benign, contexts.placement, contexts.separator],
        "prompts": crate::resume::hash(serde_json::to_string(&prompts).expect("serialises")),
        "vars": vars,
        "divergence": div,
        "sampling": [params.temperature, params.top_k, params.top_p, params.max_new_tokens, params.seed],
    }))
}

/// Analyse `prompts` (with labels choosing the context). Writes `responses.jsonl` (resumable:
/// `inputs` from [`kl_inputs`] are checked against the folder's manifest), `kl.json`, `kl.md`
/// and `kl_by_position.{svg,png}` to `out`; returns the JSON.
#[allow(clippy::too_many_arguments)]
pub fn analyze_kl<B: Backend>(
    student: &CausalLm<B>,
    teacher: &CausalLm<B>,
    tok: &HfTokenizer,
    contexts: &Contexts,
    prompts: &[(Prompt, Label)],
    vars: &serde_json::Map<String, serde_json::Value>,
    div: &Divergence,
    params: &SamplingParams,
    inputs: serde_json::Value,
    out: &Path,
    overwrite: bool,
    top: usize,
) -> Result<serde_json::Value, EvalError> {
    let pairs: Vec<Pair> =
        prompts.iter().map(|(p, l)| Pair::new(tok, vars, contexts, p, *l).map_err(EvalError::File)).collect::<Result<_, _>>()?;
    // Per-response results are cached in responses.jsonl, so an interrupted analysis resumes.
    std::fs::create_dir_all(out).map_err(|e| EvalError::io(out, e))?;
    crate::resume::claim(out, inputs, &["responses.jsonl", "kl.json", "kl.md", "kl_by_position.svg", "kl_by_position.png"], overwrite)?;
    let cache_path = out.join("responses.jsonl");
    let mut done: HashMap<usize, (Vec<u32>, Vec<f32>)> = HashMap::new();
    for (_, c) in crate::resume::read_jsonl_as::<CachedResponse>(&cache_path)? {
        done.insert(c.index, (c.token_ids, c.divergence));
    }
    let mut file = crate::resume::JsonlFile::append_to(&cache_path)?;
    let todo: Vec<usize> = (0..pairs.len()).filter(|k| !done.contains_key(k)).collect();
    let bar = indicatif_bar(pairs.len() as u64, true);
    bar.inc(done.len() as u64);
    for chunk in todo.chunks(8) {
        let ids: Vec<Vec<u32>> = chunk.iter().map(|&k| pairs[k].student_prompt.clone()).collect();
        let index: Vec<u64> = chunk.iter().map(|&k| k as u64).collect();
        let gens = generate(student, &ids, &index, params, tok.eos_ids(), Some(tok))?;
        for (&k, g) in chunk.iter().zip(gens) {
            let v = response_divergence(div, student, teacher, &pairs[k], &g.token_ids);
            if let Some(i) = v.iter().position(|d| !d.is_finite()) {
                return Err(EvalError::File(format!(
                    "prompt {k}: the divergence is {} at response token {i}: the teacher or the student produces non-finite logits (NaN or infinite weights?)",
                    v[i]
                )));
            }
            let line = json!({ "index": k, "prompt": prompts[k].0.to_json(), "response": g.text, "token_ids": g.token_ids, "divergence": v });
            file.append(&line)?;
            done.insert(k, (g.token_ids, v));
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let rows: Vec<&[f32]> = (0..pairs.len()).map(|k| done[&k].1.as_slice()).collect();
    let profile = position_profile(&rows);
    let mut by_tok: HashMap<u32, (f64, usize)> = HashMap::new();
    for k in 0..pairs.len() {
        let (ids, v) = &done[&k];
        for (&d, &t) in v.iter().zip(ids) {
            let e = by_tok.entry(t).or_insert((0.0, 0));
            e.0 += d as f64;
            e.1 += 1;
        }
    }
    let total = span(&profile, 0, usize::MAX);
    let mean_by_pos: Vec<f64> = profile.iter().map(|(s, n)| s / *n as f64).collect();
    let bucket = |a: usize, b: usize| {
        let (s, n) = span(&profile, a, b);
        (n > 0).then(|| s / n as f64)
    };
    let (share, tokens_share) = head_share(&profile, 10).unzip();
    let mut tokens: Vec<(u32, f64, usize)> = by_tok.into_iter().map(|(t, (s, n))| (t, s, n)).collect();
    tokens.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal));
    tokens.truncate(top);
    let token_rows: Vec<serde_json::Value> = tokens
        .iter()
        .map(|(t, s, n)| json!({ "id": t, "token": tok.decode(&[*t], false).unwrap_or_default(), "total": s, "count": n, "mean": s / *n as f64 }))
        .collect();
    let result = json!({
        "responses": pairs.len(),
        "tokens": total.1,
        "mean": total.0 / total.1.max(1) as f64,
        "mean_pos_0_10": bucket(0, 10),
        "mean_pos_10_30": bucket(10, 30),
        "mean_pos_30_plus": bucket(30, usize::MAX),
        "share_pos_0_10": share,
        "tokens_pos_0_10": tokens_share,
        "mean_by_position": mean_by_pos,
        "top_tokens": token_rows,
    });
    let w = |name: &str, body: String| crate::resume::write_atomic(&out.join(name), &body);
    w("kl.json", serde_json::to_string_pretty(&result).expect("serialises"))?;
    let series = [Series { label: "mean divergence".into(), points: mean_by_pos.iter().enumerate().map(|(i, v)| (i as f64, *v)).collect(), err: None }];
    let chart = Chart { title: "Teacher–student divergence by response position", x_label: "response position", y_label: "mean divergence" };
    lines(&chart, &series, &out.join("kl_by_position"))?;
    let f = |v: &serde_json::Value| v.as_f64().map(|x| format!("{x:.4}")).unwrap_or_else(|| "–".into());
    let mut md = format!(
        "# Teacher–student divergence\n\n{} responses, {} tokens, mean {:.4}\n\n| positions | mean |\n|---|---|\n| 0–10 | {} |\n| 10–30 | {} |\n| 30+ | {} |\n\n![by position](kl_by_position.svg)\n\n| token | total | count | mean |\n|---|---|---|---|\n",
        pairs.len(),
        total.1,
        total.0 / total.1.max(1) as f64,
        f(&result["mean_pos_0_10"]),
        f(&result["mean_pos_10_30"]),
        f(&result["mean_pos_30_plus"])
    );
    for r in &token_rows {
        md += &format!("| {:?} | {:.4} | {} | {:.4} |\n", r["token"].as_str().unwrap_or(""), r["total"].as_f64().unwrap_or(0.0), r["count"], r["mean"].as_f64().unwrap_or(0.0));
    }
    w("kl.md", md)?;
    Ok(result)
}

/// What analysis needs of a line of `responses.jsonl` (it also holds the prompt and the text).
#[derive(Deserialize)]
struct CachedResponse {
    index: usize,
    token_ids: Vec<u32>,
    divergence: Vec<f32>,
}

/// Per response position: (sum of the divergence, number of responses that reach it).
pub fn position_profile(rows: &[&[f32]]) -> Vec<(f64, usize)> {
    let mut by_pos: Vec<(f64, usize)> = Vec::new();
    for v in rows {
        for (i, &d) in v.iter().enumerate() {
            if by_pos.len() <= i {
                by_pos.push((0.0, 0));
            }
            by_pos[i].0 += d as f64;
            by_pos[i].1 += 1;
        }
    }
    by_pos
}

/// Positions `a..b` of a profile: (sum of the divergence, number of tokens).
fn span(profile: &[(f64, usize)], a: usize, b: usize) -> (f64, usize) {
    profile.iter().skip(a).take(b.saturating_sub(a)).fold((0.0, 0), |(s, n), (x, m)| (s + x, n + m))
}

/// The first `k` positions' share of the total divergence, and their share of the tokens (what
/// a flat profile would give); `None` without tokens or without any divergence.
pub fn head_share(profile: &[(f64, usize)], k: usize) -> Option<(f64, f64)> {
    let (sum, n) = span(profile, 0, usize::MAX);
    let (head, head_n) = span(profile, 0, k);
    (n > 0 && sum > 0.0).then(|| (head / sum, head_n as f64 / n as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_profile_on_fixed_numbers() {
        // Two responses of lengths 3 and 1.
        let a = [1.0f32, 0.5, 0.25];
        let b = [3.0f32];
        let p = position_profile(&[&a, &b]);
        assert_eq!(p, vec![(4.0, 2), (0.5, 1), (0.25, 1)]);
        // Mean at position 0 is 2.0; the first position carries 4 / 4.75 of the divergence and
        // 2 of the 4 tokens.
        let (share, tokens) = head_share(&p, 1).unwrap();
        assert!((share - 4.0 / 4.75).abs() < 1e-12 && tokens == 0.5, "{share} {tokens}");
        assert_eq!(head_share(&p, 10), Some((1.0, 1.0)));
        assert_eq!(head_share(&[], 10), None);
        assert_eq!(head_share(&[(0.0, 3)], 10), None);
    }
}
