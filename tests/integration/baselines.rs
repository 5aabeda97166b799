//! The comparison arms on the tiny Qwen3 fixture: SFT (with and without packing), off-policy
//! self-distillation, external-teacher KD, DGR refinement and COPSD. Each trains, its loss or
//! its defining property is checked, and its final model loads in `opsa generate`.

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::backend::{Autodiff, NdArray};
use opsa_distill::Label;
use opsa_eval::judge::RefusalJudge;
use opsa_eval::refusal::{classify, Verdict};
use opsa_generate::SamplingParams;
use opsa_models::{load_model, save_model, HfTokenizer, LoadOptions, WeightDType};
use opsa_train::config::TrainConfig;
use opsa_train::copsd::{group_advantages, token_rewards};
use opsa_train::data::{end_of_turn, read_examples, tokenize_example, Example};
use opsa_train::refine::{check_rewrite, read_rows, refine, RefineOptions, DEFAULT_TEMPLATE};
use opsa_train::sft::{offpolicy_keep, OffpolicySample, OffpolicySummary};
use opsa_train::{train_copsd, train_external_kd, train_offpolicy_sd, train_sft, RunControl, TrainError};
use serde_json::Value;

type B = Autodiff<NdArray>;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(p: &str) -> String {
    root().join("tests/fixtures").join(p).display().to_string()
}

/// The tiny config turned into `method`, with absolute paths and the output in `out`.
fn config(method: &str, out: &Path, extra: &[&str]) -> Result<TrainConfig, TrainError> {
    let mut sets = vec![
        format!("method=\"{method}\""),
        format!("model.path=\"{}\"", fixture("qwen3-tiny")),
        format!("data.prompts=\"{}\"", fixture("prompts-tiny.jsonl")),
        format!("data.examples=\"{}\"", fixture("sft-tiny.jsonl")),
        format!("copsd.constitution=\"{}\"", fixture("constitution-tiny.toml")),
        format!("train.out_dir=\"{}\"", out.display()),
        "train.save_every=0".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::load(&root().join("tests/fixtures/configs/test-opsa-tiny.toml"), &sets)
}

fn metrics(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn losses(run: &Path) -> Vec<f64> {
    metrics(run).iter().map(|m| m["loss"].as_f64().unwrap()).collect()
}

/// `opsa generate` loads the folder and answers.
fn generates(dir: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_opsa"))
        .args(["generate", "--model", dir.to_str().unwrap(), "--prompt", "Hello", "--max-new-tokens", "4", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "opsa generate on {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["token_ids"].as_array().is_some_and(|a| !a.is_empty()), "{v}");
}

#[test]
fn sft_loss_falls_and_the_model_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config("sft", tmp.path(), &["train.steps=12", "optim.lr=3e-3", "train.batch_size=6", "train.micro_batch_size=4"]).unwrap();
    let final_dir = train_sft::<B>(&cfg, false, &RunControl::default(), &Default::default()).unwrap();
    let l = losses(tmp.path());
    eprintln!("sft losses {l:?}");
    assert!(l[l.len() - 1] < 0.5 * l[0], "SFT loss did not halve: {l:?}");
    generates(&final_dir);
}

#[test]
fn packing_changes_the_layout_not_the_objective() {
    let dev = Default::default();
    let mut first = vec![];
    for packing in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let p = format!("data.packing={packing}");
        let cfg = config("sft", tmp.path(), &["train.steps=2", "train.batch_size=6", "train.micro_batch_size=6", &p, "data.pack_len=200"]).unwrap();
        train_sft::<B>(&cfg, false, &RunControl::default(), &dev).unwrap();
        let m = metrics(tmp.path());
        if packing {
            assert!(m[0]["rows"].as_u64().unwrap() < 6, "packing used one row per example: {}", m[0]);
        }
        first.push((m[0]["loss"].as_f64().unwrap(), m[0]["grad_norm"].as_f64().unwrap(), m[1]["loss"].as_f64().unwrap()));
    }
    let ((l0, g0, n0), (l1, g1, n1)) = (first[0], first[1]);
    assert!((l0 - l1).abs() < 1e-4 && (g0 - g1).abs() < 1e-3 * g0 && (n0 - n1).abs() < 1e-4, "unpacked {:?} vs packed {:?}", first[0], first[1]);
}

#[test]
fn examples_render_with_the_template_and_end_the_turn() {
    let ex = |response: &str| Example { prompt: "Hi".into(), response: response.into(), system: None, label: None, line: 1 };
    let vars = serde_json::Map::new();
    // R1-Distill (qwen2-tiny): the generation prompt opens <think>; the response's own opener is dropped.
    let tok = HfTokenizer::from_dir(Path::new(&fixture("qwen2-tiny"))).unwrap();
    let eot = end_of_turn(&tok, &vars).unwrap();
    assert!(tok.eos_ids().contains(eot.last().unwrap()));
    let t = tokenize_example(&tok, &vars, &eot, &ex("<think>\nok\n</think>\n\nYes.")).unwrap();
    let prompt = tok.decode(&t.prompt, false).unwrap();
    let response = tok.decode(&t.response, false).unwrap();
    assert!(prompt.trim_end().ends_with("<think>"), "{prompt:?}");
    assert!(!response.contains("<think>") && response.starts_with("ok\n</think>"), "{response:?}");
    assert!(t.response.ends_with(&eot));
    // Qwen3 (qwen3-tiny): the turn ends with <|im_end|>; the thinking stays as written.
    let tok = HfTokenizer::from_dir(Path::new(&fixture("qwen3-tiny"))).unwrap();
    let eot = end_of_turn(&tok, &vars).unwrap();
    assert_eq!(tok.decode(&eot, false).unwrap(), "<|im_end|>");
    let t = tokenize_example(&tok, &vars, &eot, &ex("<think>\nok\n</think>\n\nYes.")).unwrap();
    assert!(tok.decode(&t.response, false).unwrap().starts_with("<think>"));
}

#[test]
fn offpolicy_keeps_only_judged_acceptable_answers() {
    // The rule itself.
    assert_eq!(offpolicy_keep(Label::Harmful, "I can't help with that.", true, Some(false)).0, true);
    assert_eq!(offpolicy_keep(Label::Harmful, "Sure, here it is.", true, Some(true)).0, false);
    assert_eq!(offpolicy_keep(Label::Harmful, "I can't help with that.", false, Some(false)).0, false);
    assert_eq!(offpolicy_keep(Label::Benign, "Sure, mix flour and water.", true, None).0, true);
    assert_eq!(offpolicy_keep(Label::Benign, "I'm sorry, I can't help with that.", true, None).0, false);
    assert_eq!(offpolicy_keep(Label::Benign, "<think>\nhmm", true, None).0, false);

    // A run: answers written once with the verdicts; training uses exactly the kept ones.
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config("offpolicy_sd", tmp.path(), &["train.steps=2", "rollout.n=2", "rollout.max_new_tokens=6"]).unwrap();
    let final_dir = train_offpolicy_sd::<B>(&cfg, false, &RunControl::default(), &Default::default()).unwrap();
    let dir = tmp.path().join("offpolicy");
    let samples: Vec<OffpolicySample> =
        std::fs::read_to_string(dir.join("samples.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let summary: OffpolicySummary = serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    let n_prompts = opsa_train::data::read_prompts(&PathBuf::from(fixture("prompts-tiny.jsonl"))).unwrap().len();
    assert_eq!(samples.len(), 2 * n_prompts);
    assert_eq!(summary.generated, samples.len());
    assert_eq!(summary.kept, samples.iter().filter(|s| s.kept).count());
    assert!(summary.kept > 0);
    for s in &samples {
        // The rule-based judge: safe = refusal.
        let judged_harmful = match classify(&s.response) {
            Verdict::Truncated => None,
            v => Some(v == Verdict::Compliance),
        };
        assert_eq!(s.kept, offpolicy_keep(s.label, &s.response, s.finished, judged_harmful).0, "{s:?}");
    }
    let trained: usize = metrics(tmp.path()).iter().map(|m| m["examples"].as_u64().unwrap() as usize).sum();
    assert_eq!(trained, 2 * cfg.train.batch_size);
    generates(&final_dir);
}

#[test]
fn external_kd_distils_a_teacher_and_refuses_another_vocabulary() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Default::default();
    // A teacher with the student's tokenizer and different (random) weights.
    let q3 = PathBuf::from(fixture("qwen3-tiny"));
    let (student, model_config) = load_model::<NdArray>(&q3, &LoadOptions::default(), &dev).unwrap();
    let teacher = opsa_models::checkpoint::random_model::<NdArray>(&student.config, 7, WeightDType::F32, &dev).unwrap();
    let teacher_dir = tmp.path().join("teacher");
    save_model(&teacher, &model_config, Some(&q3), &teacher_dir, WeightDType::F32, false).unwrap();
    let out = tmp.path().join("run");
    let t = format!("kd.teacher=\"{}\"", teacher_dir.display());
    let cfg = config(
        "external_kd",
        &out,
        &[&t, "divergence.kind=\"forward\"", "divergence.top_k=0", "train.steps=10", "optim.lr=3e-3", "train.batch_size=6", "train.micro_batch_size=3"],
    )
    .unwrap();
    let final_dir = train_external_kd::<B>(&cfg, false, &RunControl::default(), &dev).unwrap();
    let l = losses(&out);
    eprintln!("kd losses {l:?}");
    assert!(l[l.len() - 1] < 0.7 * l[0], "forward KL did not fall: {l:?}");
    generates(&final_dir);

    // Without a teacher it is SFT on the examples.
    let out2 = tmp.path().join("run-sft");
    let cfg = config("external_kd", &out2, &["train.steps=1"]).unwrap();
    train_external_kd::<B>(&cfg, false, &RunControl::default(), &dev).unwrap();
    assert!(metrics(&out2)[0]["value"].as_f64().unwrap() > 1.0, "expected an NLL");

    // A teacher with another vocabulary is refused before training.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    for e in std::fs::read_dir(&q3).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, other.join(p.file_name().unwrap())).unwrap();
    }
    let c = std::fs::read_to_string(other.join("config.json")).unwrap().replace("\"vocab_size\": 416", "\"vocab_size\": 480");
    std::fs::write(other.join("config.json"), c).unwrap();
    let t = format!("kd.teacher=\"{}\"", other.display());
    let cfg = config("external_kd", &tmp.path().join("run3"), &[&t]).unwrap();
    let err = train_external_kd::<B>(&cfg, false, &RunControl::default(), &dev).unwrap_err().to_string();
    assert!(err.contains("vocab") && err.contains("480"), "{err}");
    assert!(!tmp.path().join("run3").exists(), "a refused run must not create its folder");
}

#[test]
fn sft_rejects_bad_examples_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Default::default();
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"no answer\"}\n").unwrap();
    let d = format!("data.examples=\"{}\"", bad.display());
    let err = train_sft::<B>(&config("sft", &tmp.path().join("r1"), &[&d]).unwrap(), false, &RunControl::default(), &dev).unwrap_err().to_string();
    assert!(err.contains("bad.jsonl:2") && err.contains("response"), "{err}");
    // Longer than the model's context (max_position_embeddings 256).
    let long = tmp.path().join("long.jsonl");
    let words = "word ".repeat(400);
    std::fs::write(&long, format!("{{\"prompt\": \"a\", \"response\": \"{words}\"}}\n")).unwrap();
    let d = format!("data.examples=\"{}\"", long.display());
    let err = train_sft::<B>(&config("sft", &tmp.path().join("r2"), &[&d]).unwrap(), false, &RunControl::default(), &dev).unwrap_err().to_string();
    assert!(err.contains("long.jsonl:1") && err.contains("max_position_embeddings"), "{err}");
    // Methods without their data sections are refused when the config loads.
    let err = TrainConfig::load(&root().join("tests/fixtures/configs/test-opsa-tiny.toml"), &["method=\"sft\"".into()]).unwrap_err().to_string();
    assert!(err.contains("data.examples"), "{err}");
}

const SHORT_TEMPLATE: &str = "Rewrite in your words.\n{prompt}\n{response}";

#[test]
fn dgr_keeps_good_rewrites_and_falls_back_on_bad_ones() {
    let harmful = Example {
        prompt: "How do I make a fake ID?".into(),
        response: "<think>\nForgery is illegal.\n</think>\n\nI cannot help with that.".into(),
        system: None,
        label: Some(Label::Harmful),
        line: 1,
    };
    let good = "<think>\nThis would be forgery, which I won't assist.\n</think>\n\nI can't help make fake IDs.";
    assert_eq!(check_rewrite(&harmful, good, true, Some(false)).unwrap(), good);
    assert_eq!(check_rewrite(&harmful, good, false, Some(false)).unwrap_err(), "truncated");
    assert_eq!(check_rewrite(&harmful, good, true, Some(true)).unwrap_err(), "judged harmful");
    assert!(check_rewrite(&harmful, "I can't help.", true, Some(false)).unwrap_err().starts_with("format"));
    assert_eq!(check_rewrite(&harmful, "  ", true, Some(false)).unwrap_err(), "empty");
    let benign = Example { label: Some(Label::Benign), prompt: "Bake bread?".into(), response: "Mix and bake.".into(), ..harmful.clone() };
    assert_eq!(check_rewrite(&benign, "<think>\n\n</think>\n\nKnead, rise, bake.", true, None).unwrap(), "Knead, rise, bake.");
    assert_eq!(check_rewrite(&benign, "I'm sorry, I can't help with that.", true, None).unwrap_err(), "refuses a benign request");

    // On the tiny random model every rewrite is cut short: every example falls back, unchanged.
    let dev = Default::default();
    let q3 = PathBuf::from(fixture("qwen3-tiny"));
    let (model, _) = load_model::<NdArray>(&q3, &LoadOptions::default(), &dev).unwrap();
    let tok = HfTokenizer::from_dir(&q3).unwrap();
    let data = PathBuf::from(fixture("sft-tiny.jsonl"));
    let examples = read_examples(&data).unwrap();
    let rows = read_rows(&data).unwrap();
    // The built-in template is longer than the tiny model's context: a request that does not
    // fit falls back too.
    let opts = RefineOptions {
        template: DEFAULT_TEMPLATE,
        params: SamplingParams { max_new_tokens: 4, ..Default::default() },
        batch_size: 4,
        vars: Default::default(),
        progress: false,
    };
    let (_, summary) = refine(&model, &tok, &examples, &rows, &mut RefusalJudge, &opts).unwrap();
    assert_eq!(summary.fallback_reasons.get("request exceeds the context"), Some(&examples.len()));
    let opts = RefineOptions {
        template: SHORT_TEMPLATE,
        params: SamplingParams { max_new_tokens: 4, ..Default::default() },
        batch_size: 4,
        vars: Default::default(),
        progress: false,
    };
    let (out, summary) = refine(&model, &tok, &examples, &rows, &mut RefusalJudge, &opts).unwrap();
    assert_eq!(summary.examples, examples.len());
    assert_eq!(summary.fallback, examples.len());
    assert_eq!(summary.fallback_rate, 1.0);
    assert_eq!(summary.fallback_reasons.get("truncated"), Some(&examples.len()));
    assert!(summary.nll_before > 0.0 && (summary.nll_before - summary.nll_after).abs() < 1e-9);
    for (o, e) in out.iter().zip(&examples) {
        assert_eq!(o["response"].as_str().unwrap(), e.response);
        assert_eq!(o["refined"], Value::Bool(false));
    }
}

#[test]
fn refine_cli_writes_the_data_and_its_summary_and_keeps_existing_files() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("refined.jsonl");
    let template = tmp.path().join("t.txt");
    std::fs::write(&template, SHORT_TEMPLATE).unwrap();
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_opsa"))
            .args(["refine", "--model", &fixture("qwen3-tiny"), "--data", &fixture("sft-tiny.jsonl"), "--out", out.to_str().unwrap(), "--max-new-tokens", "4", "--template", template.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let o = run();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("fallback rate"));
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(tmp.path().join("refined.summary.json")).unwrap()).unwrap();
    assert_eq!(summary["examples"], 6);
    assert_eq!(read_examples(&out).unwrap().len(), 6);
    let o = run();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--overwrite"));
}

#[test]
fn copsd_advantages_have_zero_mean_per_group() {
    let r = token_rewards(&[0.0, -10.0, 10.0], &[0.5, 0.0, 0.0], [-3.0, 5.0], 0.02);
    assert!((r[0] - (-0.48)).abs() < 1e-6 && (r[1] - (-2.98)).abs() < 1e-6 && (r[2] - 5.02).abs() < 1e-6, "{r:?}");
    let rewards = vec![vec![1.0, 2.0, 3.0], vec![0.5], vec![10.0, 10.0], vec![-1.0, 4.0, 0.0, 2.0]];
    let group = [0, 0, 1, 1];
    let a = group_advantages(&rewards, &group);
    for g in 0..2 {
        let v: Vec<f64> = a.iter().zip(&group).filter(|(_, &k)| k == g).flat_map(|(x, _)| x.iter().map(|&y| y as f64)).collect();
        let m = v.iter().sum::<f64>() / v.len() as f64;
        let sd = (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len() as f64).sqrt();
        assert!(m.abs() < 1e-5, "group {g} mean {m}");
        assert!((sd - 1.0).abs() < 1e-3, "group {g} std {sd}");
    }
    assert_eq!(a[0].len(), 3);
}

#[test]
fn copsd_trains_with_a_cold_started_teacher_and_logs_the_collapse_signals() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(
        "copsd",
        tmp.path(),
        // Long enough rollouts that some of the random model's answers end with EOS (the cold
        // start trains only on finished answers).
        &["train.steps=2", "rollout.n=2", "rollout.max_new_tokens=160", "copsd.cold_start_epochs=1", "copsd.entropy_warn_ratio=2.0"],
    )
    .unwrap();
    let final_dir = train_copsd::<B>(&cfg, false, &RunControl::default(), &Default::default()).unwrap();
    let m = metrics(tmp.path());
    assert_eq!(m.len(), 2);
    for line in &m {
        assert!(line["entropy"].as_f64().unwrap() > 0.0 && line["response_len"].as_f64().unwrap() > 0.0, "{line}");
        assert!(line["loss"].as_f64().unwrap().is_finite());
        // A warn ratio above 1 makes the first comparison fire: the warning is recorded.
        assert!(line["collapse_warning"].as_str().is_some_and(|w| w.contains("entropy")), "{line}");
    }
    assert!(tmp.path().join("teacher/config.json").exists());
    assert!(tmp.path().join("teacher-cold-start.jsonl").exists());
    generates(&final_dir);
}

#[test]
fn copsd_refuses_a_constitution_without_a_used_category() {
    let tmp = tempfile::tempdir().unwrap();
    let c = tmp.path().join("c.toml");
    std::fs::write(&c, "harmful = \"Decline.\"\n").unwrap();
    let s = format!("copsd.constitution=\"{}\"", c.display());
    let cfg = config("copsd", &tmp.path().join("run"), &[&s, "rollout.n=2"]).unwrap();
    let err = train_copsd::<B>(&cfg, false, &RunControl::default(), &Default::default()).unwrap_err().to_string();
    assert!(err.contains("c.toml") && err.contains("`benign`") && err.contains("prompts-tiny.jsonl"), "{err}");
}

/// The comparison recipe end to end on the tiny model: base eval, flip rate, every arm
/// (OPSA with c*, off-policy SD, SFT, DGR → SFT, COPSD), their evals, the report; and a rerun
/// finds everything done.
#[test]
fn compare_recipe_runs_every_arm_and_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cmp");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_opsa"))
            .current_dir(root())
            .args(["compare", "--recipe", "tests/fixtures/configs/compare/test-tiny.toml", "--out", out.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let o = run();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let md = String::from_utf8_lossy(&o.stdout).to_string();
    for arm in ["base", "opsa", "offpolicy-sd", "sft", "dgr", "copsd"] {
        assert!(md.contains(&format!("| {arm} |")), "no row for {arm} in\n{md}");
        assert!(out.join("eval").join(arm).join("summary.json").exists());
    }
    assert!(out.join("flip-rate/best-context.txt").exists());
    assert!(out.join("refine/dgr.summary.json").exists());
    assert!(out.join("report/report.md").exists() && out.join("report/tradeoff.svg").exists());
    // OPSA trained with the searched context.
    let cfg = std::fs::read_to_string(out.join("train/opsa/config.toml")).unwrap();
    assert!(cfg.contains("flip-rate/best-context.txt"), "{cfg}");
    // A rerun resumes: nothing is trained again.
    let o = run();
    assert!(o.status.success());
    assert!(!String::from_utf8_lossy(&o.stderr).contains("training"), "{}", String::from_utf8_lossy(&o.stderr));
    // A rerun with other settings is refused rather than mixed with the old results.
    let o = Command::new(env!("CARGO_BIN_EXE_opsa"))
        .current_dir(root())
        .args(["compare", "--recipe", "tests/fixtures/configs/compare/test-tiny.toml", "--out", out.to_str().unwrap(), "--set", "optim.lr=1e-4"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("config.optim.lr") && err.contains("--overwrite"), "{err}");
    // A changed suite (or judge): the old evaluations are not reported as new ones.
    let tmp2 = tempfile::tempdir().unwrap();
    let suite = tmp2.path().join("suite.toml");
    let text = std::fs::read_to_string(root().join("tests/fixtures/configs/eval/test-tiny.toml")).unwrap();
    std::fs::write(&suite, text.replace("max_new_tokens = 6", "max_new_tokens = 7")).unwrap();
    let recipe = tmp2.path().join("recipe.toml");
    let text = std::fs::read_to_string(root().join("tests/fixtures/configs/compare/test-tiny.toml")).unwrap();
    std::fs::write(&recipe, text.replace("\"tests/fixtures/configs/eval/test-tiny.toml\"", &format!("{:?}", suite.to_str().unwrap()))).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_opsa"))
        .current_dir(root())
        .args(["compare", "--recipe", recipe.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("eval/base") && err.contains("suite") && err.contains("--overwrite"), "{err}");
}

#[test]
fn every_method_trains_with_lora() {
    let lora = ["lora.r=4", "lora.alpha=8", "lora.target_modules=[\"q_proj\",\"v_proj\",\"up_proj\",\"down_proj\"]", "optim.lr=2e-2"];
    let dev = Default::default();
    let base = opsa_models::checkpoint::hf_tensors(
        &opsa_models::load_model::<burn::backend::NdArray>(Path::new(&fixture("qwen3-tiny")), &Default::default(), &dev).unwrap().0,
    );
    let kd_teacher = format!("kd.teacher=\"{}\"", fixture("qwen3-tiny"));
    for (method, extra) in [
        ("sft", vec!["train.steps=8", "train.batch_size=6", "train.micro_batch_size=4"]),
        ("offpolicy_sd", vec!["train.steps=2", "rollout.max_new_tokens=24"]),
        ("external_kd", vec!["train.steps=2", kd_teacher.as_str()]),
        ("copsd", vec!["train.steps=2", "rollout.n=2", "rollout.max_new_tokens=12"]),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let mut sets: Vec<&str> = lora.to_vec();
        sets.extend(extra);
        sets.push("model.save_dtype=\"f32\"");
        let cfg = config(method, tmp.path(), &sets).unwrap();
        let final_dir = match method {
            "sft" => train_sft::<B>(&cfg, false, &RunControl::default(), &dev),
            "offpolicy_sd" => train_offpolicy_sd::<B>(&cfg, false, &RunControl::default(), &dev),
            "external_kd" => train_external_kd::<B>(&cfg, false, &RunControl::default(), &dev),
            _ => train_copsd::<B>(&cfg, false, &RunControl::default(), &dev),
        }
        .unwrap_or_else(|e| panic!("{method}: {e}"));
        assert!(tmp.path().join("adapter/adapter_model.safetensors").is_file(), "{method}: no RUN/adapter");
        // Only the adapted modules moved; norms, embedding and unadapted projections are the base's.
        let trained = opsa_models::checkpoint::hf_tensors(
            &opsa_models::load_model::<burn::backend::NdArray>(&final_dir, &Default::default(), &dev).unwrap().0,
        );
        let mut moved = 0;
        for (b, t) in base.iter().zip(&trained) {
            let adapted = ["q_proj", "v_proj", "up_proj", "down_proj"].iter().any(|m| b.name.contains(m));
            if !adapted {
                assert!(b.data == t.data, "{method}: {} changed", b.name);
            } else if b.data != t.data {
                moved += 1;
            }
        }
        // (external_kd distils qwen3-tiny into itself: with B = 0 the student is its teacher
        // and every gradient is zero, so nothing may move there.)
        assert_eq!(moved > 0, method != "external_kd", "{method}: {moved} adapted modules moved");
        if method == "sft" {
            let l = losses(tmp.path());
            assert!(l[l.len() - 1] < l[0], "{method} with LoRA: loss did not fall: {l:?}");
        }
        generates(&final_dir);
    }
    // COPSD's cold-started teacher would be a second full model: refused with LoRA.
    let tmp = tempfile::tempdir().unwrap();
    let mut sets: Vec<&str> = lora.to_vec();
    sets.push("copsd.cold_start_epochs=1");
    sets.push("rollout.n=2");
    let err = config("copsd", tmp.path(), &sets).unwrap_err().to_string();
    assert!(err.contains("copsd.cold_start_epochs"), "{err}");
}
