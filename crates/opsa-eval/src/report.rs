//! `opsa report`: compare runs. Each argument is an evaluation folder (`summary.json`, from
//! `opsa eval`) and/or a training folder (`metrics.jsonl`, from `opsa train`).
//!
//! Writes `report.md` (a table: harmful rate per safety benchmark, over-refusal, reasoning
//! accuracy, composite safety), `tradeoff.{svg,png}` (composite safety vs reasoning accuracy,
//! one point per run: up and to the right is better) and
//! `training_{loss,divergence,refusal_rate}.{svg,png}` (per step, for the training folders).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::plot::{lines, scatter, Chart, Point, Series};
use crate::suite::EvalError;

fn read_json(p: &Path) -> Result<Option<Value>, EvalError> {
    if !p.is_file() {
        return Ok(None);
    }
    let t = std::fs::read_to_string(p).map_err(|e| EvalError::io(p, e))?;
    serde_json::from_str(&t).map(Some).map_err(|e| EvalError::io(p, e))
}

fn name_of(p: &Path) -> String {
    p.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| p.display().to_string())
}

fn pct(v: &Value) -> String {
    v.as_f64().map(|x| format!("{:.1}", 100.0 * x)).unwrap_or_else(|| "–".into())
}

/// A rate: a number in [0, 1], or null (not measured).
fn check_rate(p: &Path, key: &str, v: &Value) -> Result<(), EvalError> {
    match v {
        Value::Null => Ok(()),
        Value::Number(n) if n.as_f64().is_some_and(|x| (0.0..=1.0).contains(&x)) => Ok(()),
        other => Err(EvalError::File(format!("{}: `{key}` is {other}, expected a rate in [0, 1] or null", p.display()))),
    }
}

/// A `summary.json` as `opsa eval` writes it: an object with a `benchmarks` object whose rates,
/// like `composite_safety` and `reasoning_mean`, lie in [0, 1].
fn check_summary(p: &Path, s: &Value) -> Result<(), EvalError> {
    let benches = s.get("benchmarks").and_then(Value::as_object).ok_or_else(|| {
        EvalError::File(format!("{}: not a summary of `opsa eval` (expected an object with `benchmarks`)", p.display()))
    })?;
    for key in ["composite_safety", "reasoning_mean"] {
        check_rate(p, key, s.get(key).unwrap_or(&Value::Null))?;
    }
    for (b, v) in benches {
        for key in ["harmful_rate", "over_refusal_rate", "accuracy"] {
            check_rate(p, &format!("benchmarks.{b}.{key}"), v.get(key).unwrap_or(&Value::Null))?;
        }
    }
    Ok(())
}

/// Build the report into `out` (an existing `report.md` is replaced only with `overwrite`);
/// returns the Markdown table.
pub fn report(runs: &[PathBuf], out: &Path, overwrite: bool) -> Result<String, EvalError> {
    if out.join("report.md").exists() && !overwrite {
        return Err(EvalError::File(format!("{}: already exists (pass --overwrite to replace it)", out.join("report.md").display())));
    }
    let mut evals: Vec<(String, Value)> = Vec::new();
    let mut curves: Vec<(String, Vec<Value>)> = Vec::new();
    for r in runs {
        let s = read_json(&r.join("summary.json"))?;
        if let Some(s) = &s {
            check_summary(&r.join("summary.json"), s)?;
        }
        let m = r.join("metrics.jsonl");
        if s.is_none() && !m.is_file() {
            return Err(EvalError::Io(format!("{}: neither summary.json (opsa eval) nor metrics.jsonl (opsa train) found", r.display())));
        }
        if let Some(s) = s {
            evals.push((name_of(r), s));
        }
        if m.is_file() {
            let rows: Vec<Value> = opsa_models::prompt::read_jsonl(&m)?.into_iter().map(|(_, v)| v).collect();
            curves.push((name_of(r), rows));
        }
    }
    std::fs::create_dir_all(out).map_err(|e| EvalError::io(out, e))?;
    let mut md = String::from("# opsa report\n\n");
    if !evals.is_empty() {
        let benches: BTreeSet<String> =
            evals.iter().flat_map(|(_, s)| s["benchmarks"].as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()).unwrap_or_default()).collect();
        // One column per (benchmark, rate) that some run has.
        let mut cols: Vec<(String, &str)> = Vec::new();
        for b in &benches {
            for (k, label) in [("harmful_rate", "harmful %"), ("over_refusal_rate", "over-refusal %"), ("accuracy", "accuracy %")] {
                if evals.iter().any(|(_, s)| s["benchmarks"][b.as_str()][k].is_number()) {
                    cols.push((format!("{b}.{k}"), label));
                }
            }
        }
        let mut header: Vec<String> = vec!["run".into()];
        header.extend(cols.iter().map(|(c, l)| format!("{} {l}", c.split('.').next().unwrap_or(""))));
        header.extend(["composite safety S %".into(), "reasoning mean %".into()]);
        md += &format!("| {} |\n|{}\n", header.join(" | "), "---|".repeat(header.len()));
        for (name, s) in &evals {
            md += &format!("| {name} | ");
            for (c, _) in &cols {
                let (b, k) = c.split_once('.').unwrap();
                md += &format!("{} | ", pct(&s["benchmarks"][b][k]));
            }
            md += &format!("{} | {} |\n", pct(&s["composite_safety"]), pct(&s["reasoning_mean"]));
        }
        md += "\nHarmful and over-refusal rates: lower is better. Composite safety S = 1 − mean of the\nharmful and over-refusal rates; reasoning: pass@1. Up and to the right in `tradeoff.svg` is better.\n";
        let points: Vec<Point> = evals
            .iter()
            .filter_map(|(n, s)| {
                Some(Point { label: n.clone(), x: 100.0 * s["composite_safety"].as_f64()?, y: 100.0 * s["reasoning_mean"].as_f64()?, x_err: None, y_err: None })
            })
            .collect();
        if !points.is_empty() {
            let chart = Chart { title: "Safety vs reasoning (up and right is better)", x_label: "composite safety S (%)", y_label: "reasoning accuracy (%)" };
            scatter(&chart, &points, &out.join("tradeoff"))?;
            md += "\n![safety vs reasoning](tradeoff.svg)\n";
        }
    }
    if !curves.is_empty() {
        let mut panels = String::new();
        for key in ["loss", "divergence", "refusal_rate"] {
            let series: Vec<Series> = curves
                .iter()
                .map(|(n, rows)| Series {
                    label: n.clone(),
                    points: rows.iter().filter_map(|r| Some((r["step"].as_f64()?, r[key].as_f64()?))).collect(),
                    err: None,
                })
                .collect();
            if series.iter().all(|s| s.points.is_empty()) {
                continue;
            }
            let title = format!("{key} per step");
            lines(&Chart { title: &title, x_label: "step", y_label: key }, &series, &out.join(format!("training_{key}")))?;
            panels += &format!("![{key}](training_{key}.svg)\n");
        }
        md += "\n## Training\n\n";
        md += &panels;
    }
    crate::resume::write_atomic(&out.join("report.md"), &md)?;
    Ok(md)
}
