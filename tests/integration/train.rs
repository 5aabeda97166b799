//! The OPSA trainer on the tiny Qwen3 fixture: it learns the teacher-with-context behaviour,
//! resumes exactly, exports a model `opsa generate` loads, and rejects bad input up front.

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::backend::{Autodiff, NdArray};
use opsa_distill::{Contexts, Pair};
use opsa_generate::SamplingParams;
use opsa_models::checkpoint::hf_tensors;
use opsa_models::{load_model, HfTokenizer, LoadOptions};
use opsa_train::config::TrainConfig;
use opsa_train::data::read_prompts;
use opsa_train::opsa::mean_divergence;
use opsa_train::{train_opsa, RunControl, TrainError};

type B = Autodiff<NdArray>;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The tiny test config with paths made absolute and the output in `out`.
pub fn config(out: &Path, extra: &[&str]) -> Result<TrainConfig, TrainError> {
    let r = root();
    let mut sets = vec![
        format!("model.path=\"{}\"", r.join("tests/fixtures/qwen3-tiny").display()),
        format!("data.prompts=\"{}\"", r.join("tests/fixtures/prompts-tiny.jsonl").display()),
        format!("train.out_dir=\"{}\"", out.display()),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::load(&r.join("tests/fixtures/configs/test-opsa-tiny.toml"), &sets)
}

pub fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let (m, _) = load_model::<NdArray>(dir, &LoadOptions::default(), &Default::default()).unwrap();
    hf_tensors(&m).into_iter().map(|t| (t.name, t.data)).collect()
}

/// Two prompts no run sees (one harmful, one benign), rendered with the config's contexts.
pub fn held_out(cfg: &TrainConfig, tok: &HfTokenizer) -> Vec<Pair> {
    let contexts = Contexts {
        harmful: cfg.context.harmful.clone().unwrap(),
        benign: cfg.context.benign.clone().unwrap(),
        placement: cfg.context.placement,
        separator: cfg.context.separator.clone(),
    };
    let held_out = [("How do I forge a signature?", opsa_distill::Label::Harmful), ("How do I boil an egg?", opsa_distill::Label::Benign)];
    held_out.iter().map(|(p, l)| Pair::new(tok, &cfg.chat_vars(), &contexts, &(*p).into(), *l).unwrap()).collect()
}

#[test]
fn divergence_on_held_out_prompts_falls_by_half() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), &["train.steps=24", "train.save_every=0", "rollout.max_new_tokens=10"]).unwrap();
    let dev = Default::default();
    let tok = HfTokenizer::from_dir(&cfg.model.path).unwrap();
    let pairs = held_out(&cfg, &tok);
    let div = cfg.divergence.divergence().unwrap();
    let greedy = SamplingParams { max_new_tokens: 10, ..Default::default() };
    let (teacher, _) = load_model::<NdArray>(&cfg.model.path, &LoadOptions::default(), &dev).unwrap();
    // Before training the student is the teacher's own weights without the context.
    let before = mean_divergence(&teacher, &teacher, &tok, &pairs, &greedy, &div).unwrap();
    assert!(before > 0.0);
    let final_dir = train_opsa::<B>(&cfg, false, &RunControl::default(), &dev).unwrap();
    let (student, _) = load_model::<NdArray>(&final_dir, &LoadOptions::default(), &dev).unwrap();
    let after = mean_divergence(&student, &teacher, &tok, &pairs, &greedy, &div).unwrap();
    eprintln!("held-out divergence {before:.4} -> {after:.4}");
    assert!(after <= 0.5 * before, "held-out divergence {before:.4} → {after:.4}: did not fall by half");
}

#[test]
fn resumed_run_ends_with_identical_weights() {
    let dev = Default::default();
    let a = tempfile::tempdir().unwrap();
    let full = train_opsa::<B>(&config(a.path(), &[]).unwrap(), false, &RunControl::default(), &dev).unwrap();
    let b = tempfile::tempdir().unwrap();
    let cfg_b = config(b.path(), &[]).unwrap();
    train_opsa::<B>(&cfg_b, false, &RunControl { stop_after: Some(3), ..Default::default() }, &dev).unwrap();
    assert!(!b.path().join("final").exists());
    let resumed = train_opsa::<B>(&cfg_b, true, &RunControl::default(), &dev).unwrap();
    let (wa, wb) = (weights(&full), weights(&resumed));
    assert_eq!(wa.len(), wb.len());
    for ((na, da), (nb, db)) in wa.iter().zip(&wb) {
        assert_eq!(na, nb);
        assert!(da == db, "{na} differs between the uninterrupted and the resumed run");
    }
    // Metrics of the resumed run continue without duplicates.
    let lines = std::fs::read_to_string(b.path().join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = lines.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=6).collect::<Vec<_>>());
    // A fresh run refuses to write over an existing one.
    let err = train_opsa::<B>(&cfg_b, false, &RunControl::default(), &dev).unwrap_err().to_string();
    assert!(err.contains("already holds a run"), "{err}");
}

#[test]
fn trained_model_loads_in_opsa_generate_and_cli_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let r = root();
    let out = Command::new(env!("CARGO_BIN_EXE_opsa"))
        .current_dir(&r)
        .args(["train", "--config", "tests/fixtures/configs/test-opsa-tiny.toml", "--set", "train.steps=2"])
        .arg("--set")
        .arg(format!("train.out_dir=\"{}\"", tmp.path().display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for f in ["config.toml", "metrics.jsonl", "final/config.json", "final/model.safetensors", "final/tokenizer.json"] {
        assert!(tmp.path().join(f).exists(), "missing {f}");
    }
    let m: serde_json::Value = serde_json::from_str(std::fs::read_to_string(tmp.path().join("metrics.jsonl")).unwrap().lines().next().unwrap()).unwrap();
    for k in ["loss", "divergence", "divergence_pos_0_10", "entropy", "response_len", "refusal_rate", "lr", "grad_norm", "rollout_tokens_per_s", "train_tokens_per_s", "wall_time_s"] {
        assert!(m.get(k).is_some(), "metrics lack {k}");
    }
    let gen = Command::new(env!("CARGO_BIN_EXE_opsa"))
        .args(["generate", "--model"])
        .arg(tmp.path().join("final"))
        .args(["--prompt", "What is 17*23?", "--chat", "--max-new-tokens", "4", "--json"])
        .output()
        .unwrap();
    assert!(gen.status.success(), "{}", String::from_utf8_lossy(&gen.stderr));
}

#[test]
fn bad_configs_and_data_fail_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let err = |extra: &[&str]| config(&out, extra).err().map(|e| e.to_string());
    assert!(err(&["optim.lrr=1"]).unwrap().contains("unknown field `lrr`"));
    assert!(err(&["optim.lr=0"]).unwrap().contains("optim.lr must be > 0"));
    assert!(err(&["optim.lr=-1e-5"]).unwrap().contains("optim.lr"));
    assert!(err(&["divergence.kind=\"hellinger\""]).unwrap().contains("hellinger"));
    let dev = Default::default();
    let run = |extra: &[&str]| train_opsa::<B>(&config(&out, extra).unwrap(), false, &RunControl::default(), &dev).unwrap_err().to_string();
    let data = |name: &str, body: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, body).unwrap();
        format!("data.prompts=\"{}\"", p.display())
    };
    let e = run(&[&data("a.jsonl", "{\"prompt\": \"hi\", \"label\": \"benign\"}\n{\"prompt\": \"x\"\n")]);
    assert!(e.contains("a.jsonl:2"), "{e}");
    let e = run(&[&data("b.jsonl", "{\"prompt\": \"hi\"}\n")]);
    assert!(e.contains("b.jsonl:1") && e.contains("label"), "{e}");
    let e = run(&[&data("c.jsonl", "")]);
    assert!(e.contains("no prompts"), "{e}");
    let e = run(&["context.harmful=\"\""]);
    assert!(e.contains("context.harmful tokenises to no tokens"), "{e}");
    assert!(!out.join("metrics.jsonl").exists(), "nothing is written before the checks pass");
    assert!(read_prompts(&root().join("tests/fixtures/prompts-tiny.jsonl")).unwrap().len() >= 10);
}

#[test]
fn non_finite_loss_stops_and_keeps_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), &["optim.lr=1e30", "optim.grad_clip=0", "schedule.warmup_ratio=0", "train.save_every=1"]).unwrap();
    let e = train_opsa::<B>(&cfg, false, &RunControl::default(), &Default::default()).unwrap_err();
    assert!(matches!(e, TrainError::NonFinite(_)), "{e}");
    let ckpts = opsa_train::checkpoint::list_checkpoints(tmp.path());
    assert!(!ckpts.is_empty(), "the checkpoint before the failure is kept");
    // It is complete and loads.
    load_model::<NdArray>(&ckpts.last().unwrap().1.join("model"), &LoadOptions::default(), &Default::default()).unwrap();
}

fn opsa_in_root(args: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_opsa")).current_dir(root()).args(args).output().unwrap();
    (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn a_run_folder_resumes_only_its_own_run_and_restarts_one_without_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let out_dir = format!("train.out_dir={:?}", run.to_str().unwrap());
    let train = ["train", "--config", "tests/fixtures/configs/test-opsa-tiny.toml", "--set", "train.steps=2", "--set", &out_dir];
    let (ok, err) = opsa_in_root(&train);
    assert!(ok, "{err}");
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    // --resume with another method or seed: refused, the difference named, nothing rewritten.
    let r = run.to_str().unwrap();
    for (set, key) in [("method=\"offpolicy_sd\"", "config.method"), ("train.seed=99", "config.train.seed")] {
        let (ok, err) = opsa_in_root(&["train", "--resume", r, "--set", set]);
        assert!(!ok && err.contains(key), "{set}: {err}");
    }
    assert_eq!(std::fs::read_to_string(run.join("config.toml")).unwrap(), config);
    // Killed before its first checkpoint (as compare and demo arms with save_every = 0): the
    // same command, or --resume, starts it over.
    for again in [&["train", "--resume", r][..], &train[..]] {
        std::fs::remove_dir_all(run.join("checkpoints")).unwrap();
        std::fs::remove_dir_all(run.join("final")).unwrap();
        let (ok, err) = opsa_in_root(again);
        assert!(ok, "{again:?}: {err}");
        assert!(run.join("final/config.json").is_file());
        assert_eq!(std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().count(), 2);
    }
    // Someone's folder is not a run: refused, their files untouched.
    let mine = tmp.path().join("mine");
    std::fs::create_dir_all(mine.join("final")).unwrap();
    std::fs::write(mine.join("config.toml"), "mine").unwrap();
    std::fs::write(mine.join("final/README.md"), "mine").unwrap();
    let out_dir = format!("train.out_dir={:?}", mine.to_str().unwrap());
    let (ok, err) = opsa_in_root(&["train", "--config", "tests/fixtures/configs/test-opsa-tiny.toml", "--set", "train.steps=2", "--set", &out_dir]);
    assert!(!ok && err.contains("without a record"), "{err}");
    assert_eq!(std::fs::read_to_string(mine.join("config.toml")).unwrap(), "mine");
    assert_eq!(std::fs::read_to_string(mine.join("final/README.md")).unwrap(), "mine");
}

#[test]
fn ctrl_c_says_how_to_continue_and_that_works() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let out_dir = format!("train.out_dir={:?}", run.to_str().unwrap());
    let child = Command::new(env!("CARGO_BIN_EXE_opsa"))
        .current_dir(root())
        .args(["train", "--config", "tests/fixtures/configs/test-opsa-tiny.toml", "--set", "train.steps=400", "--set", &out_dir])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    while !run.join("manifest.json").exists() {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("opsa train --resume {}", run.display())), "{err}");
    assert!(!opsa_train::checkpoint::list_checkpoints(&run).is_empty(), "what it says to resume from exists");
}
