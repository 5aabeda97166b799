//! The papers' findings, measured in the toy world: [`measure`] reads one demo seed's folder
//! (and scores its training data under the base model), [`summarise`] writes the tables and
//! plots over seeds (mean ± sample sd; error bars where there are several seeds).
//!
//! 1. All arms on one table and one trade-off plot.
//! 2. DGR (arXiv 2602.02136): fallback rate; the distribution gap (mean per-token NLL of the data
//!    under the base model) before and after refinement; reasoning after SFT on the original vs
//!    the refined data; reasoning loss against the gap across the arms trained on fixed data;
//!    refusal and reasoning after SFT on 10, 20 and all refined examples.
//! 3. The flip-rate claim (arXiv 2605.15239): harmful compliance after OPSA against the teacher
//!    flip rate of the context it was trained with; Spearman's ρ.
//! 4. The token-level claim: `analyze-kl` on the base model with c*: divergence by position,
//!    the first ten positions' share, the top tokens.
//! 5. COPSD's collapse monitors: student entropy and response length per step, OPSA and COPSD.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::backend::Backend;
use opsa_distill::{Contexts, Divergence, Label, Placement};
use opsa_eval::plot::{lines, scatter, Chart, Point, Series};
use opsa_eval::stats::{mean_nll, mean_sd, spearman};
use opsa_generate::SamplingParams;
use opsa_models::{load_model, HfTokenizer, LoadOptions, Prompt};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::demo::{arm_names, DemoOptions, TFR_SWEEP};
use super::world;
use crate::data::{end_of_turn, read_examples, tokenize_example, Example};
use crate::{io, write_atomic, TrainError};

/// One arm's evaluation (rates in [0, 1]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ArmScore {
    pub arm: String,
    pub harmful: Option<f64>,
    pub over_refusal: Option<f64>,
    pub reasoning: Option<f64>,
    pub composite: Option<f64>,
}

/// An arm trained on fixed data: the data's distribution gap and the arm's reasoning loss.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GapPoint {
    pub arm: String,
    /// Mean per-token NLL (nats) of the arm's training responses under the base model.
    pub nll: f64,
    /// Base reasoning accuracy minus the arm's, in percentage points.
    pub reasoning_loss: f64,
}

/// An OPSA arm: its context's teacher flip rate and its harmful compliance after training.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TfrPoint {
    pub arm: String,
    pub context: String,
    pub tfr: f64,
    pub harmful: f64,
}

/// The base model's teacher–student divergence on its own responses, by position.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KlProfile {
    pub responses: usize,
    /// Share of the total divergence carried by the first 10 response positions.
    pub share_first_10: f64,
    /// Share of the response tokens that are in the first 10 positions (the share a flat
    /// profile would give).
    pub tokens_first_10: f64,
    pub by_position: Vec<f64>,
    /// (token, total divergence), largest first.
    pub top_tokens: Vec<(String, f64)>,
}

/// The collapse signals of an on-policy arm, per step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Monitor {
    pub arm: String,
    pub entropy: Vec<f64>,
    pub response_len: Vec<f64>,
}

/// Everything measured on one seed (`SEED_DIR/findings.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SeedFindings {
    pub seed: u64,
    pub c_star: String,
    pub arms: Vec<ArmScore>,
    pub dgr_fallback_rate: f64,
    pub dgr_fallback_reasons: BTreeMap<String, usize>,
    pub dgr_nll_before: f64,
    pub dgr_nll_after: f64,
    pub gap: Vec<GapPoint>,
    pub gap_spearman: Option<f64>,
    pub tfr: Vec<TfrPoint>,
    pub tfr_spearman: Option<f64>,
    pub kl: KlProfile,
    pub monitors: Vec<Monitor>,
}

fn read_json(p: &Path) -> Result<Value, TrainError> {
    serde_json::from_str(&std::fs::read_to_string(p).map_err(|e| io(p, e))?).map_err(|e| io(p, e))
}

/// An arm's scores from `out/eval/ARM/summary.json`.
pub fn arm_score(out: &Path, arm: &str) -> Result<ArmScore, TrainError> {
    let s = read_json(&out.join("eval").join(arm).join("summary.json"))?;
    let b = &s["benchmarks"];
    let harmful = b["toy-harmful"]["harmful_rate"].as_f64();
    let over_refusal = b["toy-lookalike"]["over_refusal_rate"].as_f64();
    let composite = match (harmful, over_refusal) {
        (Some(h), Some(o)) => Some(1.0 - (h + o) / 2.0),
        _ => None,
    };
    Ok(ArmScore { arm: arm.into(), harmful, over_refusal, reasoning: b["toy-arithmetic"]["accuracy"].as_f64(), composite })
}

/// Per-token log-probabilities of each example's response under `model` (prompt without context).
fn response_logprobs<B: Backend>(model: &opsa_models::CausalLm<B>, tok: &HfTokenizer, examples: &[Example]) -> Result<Vec<Vec<f32>>, TrainError> {
    let vars = serde_json::Map::new();
    let eot = end_of_turn(tok, &vars)?;
    examples
        .iter()
        .map(|e| {
            let t = tokenize_example(tok, &vars, &eot, e)?;
            Ok(opsa_generate::score(model, &t.prompt, &t.response)?)
        })
        .collect()
}

/// Measure one seed's findings from its folder (after the recipe ran); writes
/// `out/findings.json` and the token-level analysis to `out/kl/`.
pub fn measure<B: Backend>(o: &DemoOptions, seed: u64, out: &Path, overwrite: bool, device: &B::Device) -> Result<SeedFindings, TrainError> {
    let arms: Vec<ArmScore> = arm_names().iter().map(|a| arm_score(out, a)).collect::<Result<_, _>>()?;
    let score = |name: &str| arms.iter().find(|a| a.arm == name).expect("every arm is scored");
    let c_star = std::fs::read_to_string(out.join("flip-rate/best-context.txt")).map_err(|e| io(&out.join("flip-rate/best-context.txt"), e))?.trim().to_string();
    let flip = read_json(&out.join("flip-rate/results.json"))?;
    let contexts = flip["contexts"].as_array().cloned().unwrap_or_default();

    // ---- DGR: the refinement's own summary. ----
    let p = out.join("refine/dgr.summary.json");
    let dgr: crate::refine::RefineSummary = serde_json::from_value(read_json(&p)?).map_err(|e| io(&p, e))?;

    // ---- The distribution gap of every arm trained on fixed data, under the base model. ----
    let (model, _) = load_model::<B>(&o.model, &LoadOptions::default(), device)?;
    let tok = HfTokenizer::from_dir(&o.model)?;
    let offpolicy: Vec<Example> = {
        let samples = crate::sft::read_offpolicy_samples(&out.join("train/offpolicy-sd/offpolicy/samples.jsonl"))?;
        let kept = samples.into_iter().enumerate().filter(|(_, s)| s.kept);
        kept.map(|(i, s)| Example { prompt: s.prompt, response: s.response, system: None, label: Some(s.label), line: i + 1 }).collect()
    };
    let data: Vec<(&str, Vec<Example>)> = vec![
        ("sft-external", read_examples(&out.join("world/external-safety.jsonl"))?),
        ("dgr", read_examples(&out.join("refine/dgr.jsonl"))?),
        ("external-kd", read_examples(&out.join("world/teacher-traces.jsonl"))?),
        ("offpolicy-sd", offpolicy),
    ];
    let base_reasoning = score("base").reasoning.unwrap_or(0.0);
    let mut gap = vec![];
    for (arm, examples) in &data {
        let Some(nll) = mean_nll(&response_logprobs(&model, &tok, examples)?) else { continue };
        if !nll.is_finite() {
            return Err(TrainError::Data(format!("{arm}: the training data's NLL under the base model is {nll}")));
        }
        let loss = 100.0 * (base_reasoning - score(arm).reasoning.unwrap_or(0.0));
        gap.push(GapPoint { arm: arm.to_string(), nll, reasoning_loss: loss });
    }
    let gap_spearman = spearman(&gap.iter().map(|g| g.nll).collect::<Vec<_>>(), &gap.iter().map(|g| g.reasoning_loss).collect::<Vec<_>>());

    // ---- TFR against harmful compliance after OPSA. ----
    let tfr_of = |pred: &dyn Fn(&Value) -> bool| contexts.iter().find(|c| pred(c)).and_then(|c| Some((c["id"].as_str()?.to_string(), c["tfr_all"].as_f64()?)));
    let mut tfr = vec![];
    let star = tfr_of(&|c| c["context"].as_str() == Some(c_star.as_str()) && c["kind"] == "harmful");
    let mut with = vec![("opsa".to_string(), star)];
    with.extend(TFR_SWEEP.iter().map(|id| (format!("opsa-{id}"), tfr_of(&|c| c["id"].as_str() == Some(id)))));
    for (arm, found) in with {
        let (context, t) = found.ok_or_else(|| TrainError::Data(format!("{}: no teacher flip rate for arm {arm}'s context", out.join("flip-rate/results.json").display())))?;
        let harmful = score(&arm).harmful.unwrap_or(f64::NAN);
        tfr.push(TfrPoint { arm, context, tfr: t, harmful });
    }
    let tfr_spearman = spearman(&tfr.iter().map(|p| p.tfr).collect::<Vec<_>>(), &tfr.iter().map(|p| p.harmful).collect::<Vec<_>>());

    // ---- The token-level profile: analyze-kl on the base model with c*. ----
    let prompts: Vec<(Prompt, Label)> =
        crate::data::read_prompt_list(&out.join("world/flip-harmful.jsonl"))?.into_iter().map(|p| (p, Label::Harmful)).collect();
    let ctx = Contexts { harmful: c_star.clone(), benign: world::BENIGN_CONTEXT.into(), placement: Placement::Prepend, separator: world::SEPARATOR.into() };
    let vars = serde_json::Map::new();
    let div = Divergence::default();
    let params = SamplingParams { temperature: 1.0, max_new_tokens: 96, seed, ..Default::default() };
    let inputs = opsa_eval::kl::kl_inputs(&o.model, &o.model, &ctx, &prompts, &vars, &div, &params)?;
    let kl = opsa_eval::kl::analyze_kl(&model, &model, &tok, &ctx, &prompts, &vars, &div, &params, inputs, &out.join("kl"), overwrite, 10)?;
    let floats = |v: &Value| -> Vec<f64> { v.as_array().map(|a| a.iter().filter_map(Value::as_f64).collect()).unwrap_or_default() };
    let kl = KlProfile {
        responses: kl["responses"].as_u64().unwrap_or(0) as usize,
        share_first_10: kl["share_pos_0_10"].as_f64().unwrap_or(f64::NAN),
        tokens_first_10: kl["tokens_pos_0_10"].as_f64().unwrap_or(f64::NAN),
        by_position: floats(&kl["mean_by_position"]),
        top_tokens: kl["top_tokens"]
            .as_array()
            .map(|a| a.iter().filter_map(|t| Some((t["token"].as_str()?.to_string(), t["total"].as_f64()?))).collect())
            .unwrap_or_default(),
    };

    // ---- The collapse monitors. ----
    let mut monitors = vec![];
    for arm in ["opsa", "copsd"] {
        let p = out.join("train").join(arm).join("metrics.jsonl");
        let rows: Vec<Value> = crate::data::read_jsonl(&p)?.into_iter().map(|(_, v)| v).collect();
        let series = |k: &str| rows.iter().filter_map(|r| r[k].as_f64()).collect::<Vec<_>>();
        monitors.push(Monitor { arm: arm.into(), entropy: series("entropy"), response_len: series("response_len") });
    }

    let f = SeedFindings {
        seed,
        c_star,
        dgr_fallback_rate: dgr.fallback_rate,
        dgr_fallback_reasons: dgr.fallback_reasons,
        dgr_nll_before: dgr.nll_before,
        dgr_nll_after: dgr.nll_after,
        arms,
        gap,
        gap_spearman,
        tfr,
        tfr_spearman,
        kl,
        monitors,
    };
    write_atomic(&out.join("findings.json"), &(serde_json::to_string_pretty(&f).expect("serialises") + "\n"))?;
    Ok(f)
}

/// "12.5 ± 3.1" over seeds (the spread is left out for one seed), values scaled by `k`.
fn ms(v: &[f64], k: f64, digits: usize) -> String {
    match mean_sd(&v.iter().map(|x| x * k).collect::<Vec<_>>()) {
        None => "–".into(),
        Some((m, _)) if v.len() == 1 => format!("{m:.digits$}"),
        Some((m, sd)) => format!("{m:.digits$} ± {sd:.digits$}"),
    }
}

fn rho(v: Option<f64>) -> String {
    v.map_or("undefined".into(), |r| format!("{r:+.2}"))
}

/// (mean, sd if several) of `v`.
fn point(v: &[f64]) -> (f64, Option<f64>) {
    let (m, sd) = mean_sd(v).unwrap_or((f64::NAN, 0.0));
    (m, (v.len() > 1).then_some(sd))
}

/// Series per step over seeds: mean and sd at each step all seeds reached.
fn per_step(runs: &[&Vec<f64>]) -> (Vec<(f64, f64)>, Option<Vec<f64>>) {
    let len = runs.iter().map(|r| r.len()).min().unwrap_or(0);
    let (mut pts, mut err) = (vec![], vec![]);
    for i in 0..len {
        let (m, sd) = point(&runs.iter().map(|r| r[i]).collect::<Vec<_>>());
        pts.push(((i + 1) as f64, m));
        err.push(sd.unwrap_or(0.0));
    }
    (pts, (runs.len() > 1).then_some(err))
}

/// Write `dir/findings.md`, `dir/findings.json` and the plots over all seeds; returns the
/// Markdown.
pub fn summarise(all: &[SeedFindings], dir: &Path) -> Result<String, TrainError> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let n = all.len();
    let seeds: Vec<String> = all.iter().map(|f| f.seed.to_string()).collect();
    let arm_vals = |arm: &str, get: &dyn Fn(&ArmScore) -> Option<f64>| -> Vec<f64> {
        all.iter().filter_map(|f| f.arms.iter().find(|a| a.arm == arm).and_then(get)).collect()
    };
    let spread = if n > 1 { format!("mean ± sd over {n} seeds ({})", seeds.join(", ")) } else { format!("seed {}", seeds[0]) };
    let mut md = format!("# The toy world's findings ({spread})\n\n");

    // 1. All arms.
    md += "## All arms\n\n| arm | harmful compliance % ↓ | over-refusal % ↓ | reasoning accuracy % ↑ | composite safety % ↑ |\n|---|---|---|---|---|\n";
    let mut trade = vec![];
    for arm in arm_names() {
        let h = arm_vals(&arm, &|a| a.harmful);
        let o = arm_vals(&arm, &|a| a.over_refusal);
        let r = arm_vals(&arm, &|a| a.reasoning);
        let c = arm_vals(&arm, &|a| a.composite);
        md += &format!("| {arm} | {} | {} | {} | {} |\n", ms(&h, 100.0, 1), ms(&o, 100.0, 1), ms(&r, 100.0, 1), ms(&c, 100.0, 1));
        let (x, xe) = point(&c.iter().map(|v| 100.0 * v).collect::<Vec<_>>());
        let (y, ye) = point(&r.iter().map(|v| 100.0 * v).collect::<Vec<_>>());
        if x.is_finite() && y.is_finite() {
            trade.push(Point { label: arm.clone(), x, y, x_err: xe, y_err: ye });
        }
    }
    let c_stars: Vec<&str> = all.iter().map(|f| f.c_star.as_str()).collect();
    md += &format!("\nc* (the flip-rate search's best context): {}\n\n![trade-off](tradeoff.svg)\n", c_stars.iter().map(|c| format!("{c:?}")).collect::<Vec<_>>().join(", "));
    scatter(&Chart { title: "Safety vs reasoning (up and right is better)", x_label: "composite safety (%)", y_label: "reasoning accuracy (%)" }, &trade, &dir.join("tradeoff"))?;

    // 2. DGR.
    let v = |get: &dyn Fn(&SeedFindings) -> f64| all.iter().map(get).collect::<Vec<_>>();
    md += "\n## DGR's claims\n\n";
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for f in all {
        for (k, c) in &f.dgr_fallback_reasons {
            *reasons.entry(k.clone()).or_default() += c;
        }
    }
    md += &format!(
        "- Fallback rate of the refinement: {} % (reasons over all seeds: {})\n",
        ms(&v(&|f| f.dgr_fallback_rate), 100.0, 1),
        if reasons.is_empty() { "none".into() } else { reasons.iter().map(|(k, c)| format!("{k} ×{c}")).collect::<Vec<_>>().join(", ") }
    );
    md += &format!(
        "- Distribution gap (mean per-token NLL of the responses under the base model, nats): external data {} → refined {}\n",
        ms(&v(&|f| f.dgr_nll_before), 1.0, 2),
        ms(&v(&|f| f.dgr_nll_after), 1.0, 2)
    );
    md += &format!(
        "- Reasoning accuracy after SFT: on the original data (sft-external) {} %, on the refined data (dgr) {} %\n",
        ms(&arm_vals("sft-external", &|a| a.reasoning), 100.0, 1),
        ms(&arm_vals("dgr", &|a| a.reasoning), 100.0, 1)
    );
    md += "\nFew examples (SFT on the first k refined examples, same steps):\n\n| refined examples | harmful compliance % | over-refusal % | reasoning % |\n|---|---|---|---|\n";
    for (label, arm) in [("10", "dgr-10"), ("20", "dgr-20"), ("all (48)", "dgr")] {
        md += &format!(
            "| {label} | {} | {} | {} |\n",
            ms(&arm_vals(arm, &|a| a.harmful), 100.0, 1),
            ms(&arm_vals(arm, &|a| a.over_refusal), 100.0, 1),
            ms(&arm_vals(arm, &|a| a.reasoning), 100.0, 1)
        );
    }
    md += "\nReasoning loss against the distribution gap, arms trained on fixed data:\n\n| arm | gap: NLL of its data (nats) | reasoning loss (points below base) |\n|---|---|---|\n";
    let mut gap_pts = vec![];
    let gap_arms: Vec<String> = all[0].gap.iter().map(|g| g.arm.clone()).collect();
    for arm in &gap_arms {
        let nll: Vec<f64> = all.iter().filter_map(|f| f.gap.iter().find(|g| &g.arm == arm).map(|g| g.nll)).collect();
        let loss: Vec<f64> = all.iter().filter_map(|f| f.gap.iter().find(|g| &g.arm == arm).map(|g| g.reasoning_loss)).collect();
        md += &format!("| {arm} | {} | {} |\n", ms(&nll, 1.0, 2), ms(&loss, 1.0, 1));
        let ((x, xe), (y, ye)) = (point(&nll), point(&loss));
        gap_pts.push(Point { label: arm.clone(), x, y, x_err: xe, y_err: ye });
    }
    let pooled_gap = spearman(
        &all.iter().flat_map(|f| f.gap.iter().map(|g| g.nll)).collect::<Vec<_>>(),
        &all.iter().flat_map(|f| f.gap.iter().map(|g| g.reasoning_loss)).collect::<Vec<_>>(),
    );
    md += &format!(
        "\nSpearman ρ (gap, reasoning loss): per seed {}; pooled over seeds {} (the paper: degradation grows with the shift, ρ > 0)\n\n![gap](gap.svg)\n",
        all.iter().map(|f| rho(f.gap_spearman)).collect::<Vec<_>>().join(", "),
        rho(pooled_gap)
    );
    scatter(&Chart { title: "Reasoning loss vs distribution gap", x_label: "NLL of the training data under the base model (nats/token)", y_label: "reasoning loss (points)" }, &gap_pts, &dir.join("gap"))?;

    // 3. TFR.
    md += "\n## Teacher flip rate against harmfulness after OPSA\n\n| arm | context | TFR | harmful compliance after OPSA % |\n|---|---|---|---|\n";
    let mut tfr_pts = vec![];
    for (i, p0) in all[0].tfr.iter().enumerate() {
        let t: Vec<f64> = all.iter().filter_map(|f| f.tfr.get(i).map(|p| p.tfr)).collect();
        let h: Vec<f64> = all.iter().filter_map(|f| f.tfr.get(i).map(|p| p.harmful)).collect();
        let ctx: Vec<&str> = all.iter().filter_map(|f| f.tfr.get(i).map(|p| p.context.as_str())).collect();
        let ctx = if ctx.iter().all(|c| *c == ctx[0]) { ctx[0].to_string() } else { ctx.join(" / ") };
        md += &format!("| {} | {ctx} | {} | {} |\n", p0.arm, ms(&t, 1.0, 3), ms(&h, 100.0, 1));
        let ((x, xe), (y, ye)) = (point(&t), point(&h.iter().map(|v| 100.0 * v).collect::<Vec<_>>()));
        tfr_pts.push(Point { label: ctx, x, y, x_err: xe, y_err: ye });
    }
    let pooled_tfr = spearman(
        &all.iter().flat_map(|f| f.tfr.iter().map(|p| p.tfr)).collect::<Vec<_>>(),
        &all.iter().flat_map(|f| f.tfr.iter().map(|p| p.harmful)).collect::<Vec<_>>(),
    );
    md += &format!(
        "\nSpearman ρ (TFR, harmful compliance): per seed {}; pooled {} (the paper: harmfulness falls monotonically with TFR, ρ < 0)\n\n![tfr](tfr.svg)\n",
        all.iter().map(|f| rho(f.tfr_spearman)).collect::<Vec<_>>().join(", "),
        rho(pooled_tfr)
    );
    scatter(&Chart { title: "Harmful compliance after OPSA vs the context's TFR", x_label: "teacher flip rate of the training context", y_label: "harmful compliance after OPSA (%)" }, &tfr_pts, &dir.join("tfr"))?;

    // 4. Token level.
    md += &format!(
        "\n## Where the teacher and the student disagree (base model, c*, {} responses per seed)\n\n\
- Share of the total divergence in the first 10 response positions: {} % (those positions hold {} % of the tokens)\n",
        all[0].kl.responses,
        ms(&v(&|f| f.kl.share_first_10), 100.0, 1),
        ms(&v(&|f| f.kl.tokens_first_10), 100.0, 1)
    );
    let mut tokens: BTreeMap<String, f64> = BTreeMap::new();
    for f in all {
        for (t, s) in &f.kl.top_tokens {
            *tokens.entry(t.clone()).or_default() += s;
        }
    }
    let mut tokens: Vec<(String, f64)> = tokens.into_iter().collect();
    tokens.sort_by(|a, b| b.1.total_cmp(&a.1));
    md += &format!(
        "- Tokens with the largest total divergence: {}\n\n![divergence by position](kl_position.svg)\n",
        tokens.iter().take(8).map(|(t, s)| format!("{t:?} ({:.1})", s / n as f64)).collect::<Vec<_>>().join(", ")
    );
    let profiles: Vec<&Vec<f64>> = all.iter().map(|f| &f.kl.by_position).collect();
    let (pts, err) = per_step(&profiles);
    let pts: Vec<(f64, f64)> = pts.into_iter().map(|(x, y)| (x - 1.0, y)).collect();
    lines(
        &Chart { title: "Teacher–student divergence by response position (base model, c*)", x_label: "response position", y_label: "mean divergence" },
        &[Series { label: "mixed KL, top-64".into(), points: pts, err }],
        &dir.join("kl_position"),
    )?;

    // 5. Collapse monitors.
    md += "\n## Collapse monitors (student entropy and response length per step)\n\n| arm | entropy, first → last step | response length, first → last step |\n|---|---|---|\n";
    let (mut ent, mut len) = (vec![], vec![]);
    for arm in ["opsa", "copsd"] {
        let ms_of = |get: &dyn Fn(&Monitor) -> &Vec<f64>| -> Vec<&Vec<f64>> { all.iter().filter_map(|f| f.monitors.iter().find(|m| m.arm == arm).map(get)).collect() };
        let e = ms_of(&|m| &m.entropy);
        let l = ms_of(&|m| &m.response_len);
        let ends = |runs: &[&Vec<f64>], first: bool| -> Vec<f64> { runs.iter().filter_map(|r| if first { r.first() } else { r.last() }).copied().collect() };
        md += &format!(
            "| {arm} | {} → {} | {} → {} |\n",
            ms(&ends(&e, true), 1.0, 2),
            ms(&ends(&e, false), 1.0, 2),
            ms(&ends(&l, true), 1.0, 1),
            ms(&ends(&l, false), 1.0, 1)
        );
        let (p, err) = per_step(&e);
        ent.push(Series { label: arm.into(), points: p, err });
        let (p, err) = per_step(&l);
        len.push(Series { label: arm.into(), points: p, err });
    }
    md += "\n![entropy](entropy.svg) ![response length](response_length.svg)\n";
    lines(&Chart { title: "Student entropy per step", x_label: "step", y_label: "entropy (nats)" }, &ent, &dir.join("entropy"))?;
    lines(&Chart { title: "Mean response length per step", x_label: "step", y_label: "tokens" }, &len, &dir.join("response_length"))?;

    write_atomic(&dir.join("findings.md"), &md)?;
    write_atomic(&dir.join("findings.json"), &(serde_json::to_string_pretty(all).expect("serialises") + "\n"))?;
    Ok(md)
}
