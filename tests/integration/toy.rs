//! The embedded toy world: pretraining builds a model folder our loader and tokenizer read, and
//! a shortened `opsa demo` on the shipped model runs the whole pipeline.

use std::path::PathBuf;
use std::process::Command;

use burn::backend::{Autodiff, NdArray};
use opsa_models::{load_model, ChatMessage, HfTokenizer, LoadOptions};
use opsa_train::toy::{pretrain, PretrainOptions};
use opsa_train::{RunControl, TrainError};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn toy_pretrain_builds_a_model_folder_that_loads_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let o = PretrainOptions {
        out: tmp.path().join("model"),
        work: tmp.path().join("work"),
        steps: 3,
        corpus_size: 400,
        batch_size: 8,
        ..Default::default()
    };
    let dev = Default::default();
    // Stop after 2 steps (a checkpoint), then a rerun resumes and finishes.
    let stop = RunControl { stop_after: Some(2), ..Default::default() };
    let e = pretrain::<Autodiff<NdArray>>(&o, &stop, &dev).unwrap_err();
    assert!(matches!(e, TrainError::Interrupted(_)), "{e}");
    assert!(!o.out.exists());
    let out = pretrain::<Autodiff<NdArray>>(&o, &RunControl::default(), &dev).unwrap();
    let lines = std::fs::read_to_string(o.work.join("run/metrics.jsonl")).unwrap().lines().count();
    assert_eq!(lines, 3);
    let tok = HfTokenizer::from_dir(&out).unwrap();
    let (model, _) = load_model::<NdArray>(&out, &LoadOptions::default(), &dev).unwrap();
    tok.check_vocab(model.config.vocab_size).unwrap();
    // Digits are single tokens; the think tags and turn markers are single tokens.
    let ids = tok.encode("<think>\n37 + 48</think>", false).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), "<think>\n37 + 48</think>");
    assert!(ids.len() >= 7);
    let text = tok.apply_chat_template(&[ChatMessage::user("What is 1 + 2?")], true, &Default::default()).unwrap();
    assert_eq!(text, "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n");
    // A second pretrain into the same folder is refused.
    assert!(pretrain::<Autodiff<NdArray>>(&o, &RunControl::default(), &dev).unwrap_err().to_string().contains("--overwrite"));
    // The work folder with another seed or corpus: refused, never the old model under a new name.
    for other in [PretrainOptions { seed: 1, out: tmp.path().join("m2"), ..o.clone() }, PretrainOptions { corpus_size: 300, out: tmp.path().join("m2"), ..o.clone() }] {
        let e = pretrain::<Autodiff<NdArray>>(&other, &RunControl::default(), &dev).unwrap_err().to_string();
        assert!((e.contains("seed") || e.contains("corpus_size")) && e.contains("--overwrite"), "{e}");
        assert!(!other.out.exists());
    }
}

/// The shipped models: small together, loadable, and the teacher shares the student's tokenizer.
#[test]
fn the_shipped_toy_models_are_small_and_load() {
    let mut size = 0;
    for name in ["toy-qwen3", "toy-qwen3-teacher"] {
        let dir = root().join("models").join(name);
        size += std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum::<u64>();
        let (model, _) = load_model::<NdArray>(&dir, &LoadOptions::default(), &Default::default()).unwrap();
        HfTokenizer::from_dir(&dir).unwrap().check_vocab(model.config.vocab_size).unwrap();
    }
    assert!(size < 10_000_000, "the shipped toy models take {size} bytes");
    let tok = |n: &str| std::fs::read(root().join("models").join(n).join("tokenizer.json")).unwrap();
    assert_eq!(tok("toy-qwen3"), tok("toy-qwen3-teacher"));
}

#[test]
fn a_shortened_demo_runs_every_arm_and_measures_the_findings() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let model = root().join("models/toy-qwen3");
    let teacher = root().join("models/toy-qwen3-teacher");
    let o = Command::new(env!("CARGO_BIN_EXE_opsa"))
        .args(["demo", "--out", out.to_str().unwrap(), "--steps", "2", "--eval-items", "4"])
        .args(["--model", model.to_str().unwrap(), "--teacher", teacher.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let text = String::from_utf8_lossy(&o.stdout);
    for arm in opsa_train::toy::demo::arm_names() {
        assert!(text.contains(&format!("| {arm} |")), "missing arm {arm:?} in\n{text}");
        assert!(out.join("eval").join(&arm).join("summary.json").exists(), "{arm} was not evaluated");
    }
    for row in ["Fallback rate", "Distribution gap", "Spearman ρ (TFR, harmful compliance)", "first 10 response positions", "copsd |"] {
        assert!(text.contains(row), "missing {row:?} in\n{text}");
    }
    for f in [
        "recipe.toml",
        "configs/copsd.toml",
        "world/constitution.toml",
        "world/teacher-traces.jsonl",
        "refine/dgr.summary.json",
        "refine/dgr-10.jsonl",
        "kl/kl.json",
        "findings.json",
        "report/report.md",
        "findings/findings.md",
        "findings/tradeoff.svg",
        "findings/tradeoff.png",
        "findings/tfr.png",
        "findings/gap.png",
        "findings/kl_position.png",
        "findings/entropy.png",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    // The flip-rate search ranked the pool: the general context flips more than an irrelevant one.
    let r: Value = serde_json::from_str(&std::fs::read_to_string(out.join("flip-rate/results.json")).unwrap()).unwrap();
    let tfr = |id: &str| r["contexts"].as_array().unwrap().iter().find(|c| c["id"] == id).unwrap()["tfr_all"].as_f64().unwrap();
    assert!(tfr("general") > tfr("step-by-step"), "{r}");
    // OPSA trained with c*, the sweep with its own contexts; DGR on 10 refined examples; the
    // KD arm against the teacher; COPSD with the constitution.
    assert!(std::fs::read_to_string(out.join("train/opsa/config.toml")).unwrap().contains("best-context.txt"));
    assert!(std::fs::read_to_string(out.join("train/opsa-helpful-assistant/config.toml")).unwrap().contains("You are a helpful assistant."));
    assert_eq!(std::fs::read_to_string(out.join("refine/dgr-10.jsonl")).unwrap().lines().count(), 10);
    assert!(std::fs::read_to_string(out.join("train/external-kd/config.toml")).unwrap().contains("toy-qwen3-teacher"));
    assert!(std::fs::read_to_string(out.join("train/copsd/config.toml")).unwrap().contains("constitution.toml"));
    // The findings record every TFR point and both monitors, with one entry per step.
    let f: Value = serde_json::from_str(&std::fs::read_to_string(out.join("findings.json")).unwrap()).unwrap();
    assert_eq!(f["tfr"].as_array().unwrap().len(), 1 + opsa_train::toy::demo::TFR_SWEEP.len());
    assert_eq!(f["gap"].as_array().unwrap().len(), 4);
    for m in f["monitors"].as_array().unwrap() {
        assert_eq!(m["entropy"].as_array().unwrap().len(), 2, "{m}");
    }
    // A rerun resumes: nothing is trained again, the same findings come out.
    let o = Command::new(env!("CARGO_BIN_EXE_opsa"))
        .args(["demo", "--out", out.to_str().unwrap(), "--steps", "2", "--eval-items", "4"])
        .args(["--model", model.to_str().unwrap(), "--teacher", teacher.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success() && !String::from_utf8_lossy(&o.stderr).contains("training ("), "{}", String::from_utf8_lossy(&o.stderr));
    let again: Value = serde_json::from_str(&std::fs::read_to_string(out.join("findings.json")).unwrap()).unwrap();
    assert_eq!(f, again);
}

#[test]
fn a_demo_folder_refuses_other_options() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    std::fs::create_dir_all(&out).unwrap();
    let model = root().join("models/toy-qwen3");
    let teacher = root().join("models/toy-qwen3-teacher");
    std::fs::write(out.join("demo-options.json"), serde_json::json!({"model": model, "teacher": teacher, "steps": 3, "eval_items": 4, "seed": 0, "seeds": 1}).to_string()).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_opsa"))
        .args(["demo", "--out", out.to_str().unwrap(), "--steps", "2", "--eval-items", "4", "--model", model.to_str().unwrap()])
        .args(["--teacher", teacher.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("other options"), "{err}");
}
