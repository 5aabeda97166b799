//! The embedded toy world: pretraining builds a model folder our loader and tokenizer read, and
//! a shortened `opsa demo` on the shipped model runs the whole pipeline.

use std::path::PathBuf;
use std::process::Command;

use burn::backend::{Autodiff, NdArray};
use opsa_models::{load_model, ChatMessage, HfTokenizer, LoadOptions};
use opsa_train::toy::{pretrain, PretrainOptions};
use opsa_train::RunControl;
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
    assert!(pretrain::<Autodiff<NdArray>>(&o, &stop, &dev).is_err());
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

/// The shipped model: small, and the world's behaviours are in it.
#[test]
fn the_shipped_toy_model_is_small_and_loads() {
    let dir = root().join("models/toy-qwen3");
    let size: u64 = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    assert!(size < 10_000_000, "models/toy-qwen3 is {size} bytes");
    let (model, _) = load_model::<NdArray>(&dir, &LoadOptions::default(), &Default::default()).unwrap();
    HfTokenizer::from_dir(&dir).unwrap().check_vocab(model.config.vocab_size).unwrap();
}

#[test]
fn a_shortened_demo_runs_the_whole_pipeline() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let o = Command::new(env!("CARGO_BIN_EXE_opsa"))
        .args(["demo", "--out", out.to_str().unwrap(), "--steps", "2", "--eval-items", "4", "--model", root().join("models/toy-qwen3").to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let text = String::from_utf8_lossy(&o.stdout);
    for row in ["| base |", "| opsa |", "| sft-external |", "| offpolicy-sd |", "composite safety"] {
        assert!(text.contains(row), "missing {row:?} in\n{text}");
    }
    for f in ["recipe.toml", "configs/opsa.toml", "world/train-prompts.jsonl", "flip-rate/results.json", "report/report.md", "report/tradeoff.svg"] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    // The flip-rate search ranked the pool: the general context flips more than an irrelevant one.
    let r: Value = serde_json::from_str(&std::fs::read_to_string(out.join("flip-rate/results.json")).unwrap()).unwrap();
    let tfr = |id: &str| r["contexts"].as_array().unwrap().iter().find(|c| c["id"] == id).unwrap()["tfr_all"].as_f64().unwrap();
    assert!(tfr("general") > tfr("step-by-step"), "{r}");
    // OPSA trained with c*.
    let cfg = std::fs::read_to_string(out.join("train/opsa/config.toml")).unwrap();
    assert!(cfg.contains("best-context.txt"));
}

#[test]
fn a_demo_folder_refuses_other_options() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    std::fs::create_dir_all(&out).unwrap();
    let model = root().join("models/toy-qwen3");
    std::fs::write(out.join("demo-options.json"), serde_json::json!({"model": model, "steps": 3, "eval_items": 4, "seed": 0}).to_string()).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_opsa"))
        .args(["demo", "--out", out.to_str().unwrap(), "--steps", "2", "--eval-items", "4", "--model", model.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("other options"), "{err}");
}
