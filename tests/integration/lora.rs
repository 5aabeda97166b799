//! LoRA: PEFT's initialisation and file format both ways, merged == unmerged, only the adapters
//! train (the teacher is the base with the adapters off), exact resume, bad input up front.

use std::path::Path;
use std::process::Command;

use burn::backend::{Autodiff, NdArray};
use burn::optim::GradientsParams;
use burn::tensor::{DType, Int, Tensor, TensorData};
use opsa_generate::SamplingParams;
use opsa_models::checkpoint::hf_tensors;
use opsa_models::lora::{load_adapter, save_adapter};
use opsa_models::{load_model, CausalLm, HfTokenizer, LoadOptions, LoraConfig};
use opsa_train::opsa::mean_divergence;
use opsa_train::{train_opsa, RunControl};

use crate::common::{fixture, ids, max_abs_diff, reference, reference_logits};
use crate::train::{config, held_out, root};

type B = Autodiff<NdArray>;

const ALL: &[&str] = &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

fn lora(r: usize, alpha: f64, targets: &[&str]) -> LoraConfig {
    LoraConfig { r, alpha, dropout: 0.0, target_modules: targets.iter().map(|s| s.to_string()).collect() }
}

fn base() -> CausalLm<NdArray> {
    load_model::<NdArray>(&fixture("qwen3-tiny"), &LoadOptions::default(), &Default::default()).unwrap().0
}

fn logits(m: &CausalLm<NdArray>, ids: &[u32]) -> Vec<f32> {
    let x = Tensor::<NdArray, 2, Int>::from_data(TensorData::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), [1, ids.len()]), &m.device());
    m.forward(x).into_data().to_vec::<f32>().unwrap()
}

fn inputs() -> Vec<Vec<u32>> {
    reference("qwen3-tiny")["inputs"].as_array().unwrap().iter().map(ids).collect()
}

#[test]
fn zero_b_adapter_gives_exactly_the_base_logits() {
    let m = base();
    let adapted = m.clone().with_new_adapters(&lora(8, 16.0, ALL), 3, DType::F32);
    assert!(adapted.has_adapters());
    // A is Kaiming-uniform (a = √5): within ±1/√in, not zero; B is zero.
    let a = adapted.model.layers[0].self_attn.q_proj.lora.as_ref().unwrap();
    let av = a.lora_a.val().into_data().to_vec::<f32>().unwrap();
    let bound = 1.0 / (64f32).sqrt();
    assert!(av.iter().all(|x| x.abs() <= bound) && av.iter().any(|x| x.abs() > 0.5 * bound));
    assert!(a.lora_b.val().into_data().to_vec::<f32>().unwrap().iter().all(|&x| x == 0.0));
    for ids in inputs() {
        assert!(logits(&m, &ids) == logits(&adapted, &ids), "B = 0 must give the base logits exactly");
    }
}

#[test]
fn peft_fixture_adapter_gives_peft_logits() {
    // Made by tests/fixtures/make_lora_fixture.py with peft: base + adapter logits.
    let (m, cfg) = load_adapter(base(), &fixture("lora-qwen3-tiny"), &fixture("qwen3-tiny"), DType::F32).unwrap();
    assert_eq!((cfg.r, cfg.alpha), (4, 8.0));
    let mut worst = 0.0f32;
    let plain = base();
    for (i, ids) in inputs().iter().enumerate() {
        let (_, want) = reference_logits("lora-qwen3-tiny", i);
        let got = logits(&m, ids);
        worst = worst.max(max_abs_diff(&got, &want));
        // The adapter does change the logits (the test would pass on the base otherwise).
        assert!(max_abs_diff(&logits(&plain, ids), &want) > 1e-2);
    }
    eprintln!("PEFT fixture adapter: max |logit diff| vs peft = {worst:.3e}");
    assert!(worst < 1e-4, "max |logit diff| {worst}");
}

#[test]
fn merged_equals_unmerged_and_saved_adapter_round_trips() {
    let (m, cfg) = load_adapter(base(), &fixture("lora-qwen3-tiny"), &fixture("qwen3-tiny"), DType::F32).unwrap();
    let merged = m.clone().merge_adapters();
    assert!(!merged.has_adapters());
    let off = m.without_adapters();
    for ids in inputs() {
        let (u, g) = (logits(&m, &ids), logits(&merged, &ids));
        assert!(max_abs_diff(&u, &g) < 1e-4, "merged vs unmerged {}", max_abs_diff(&u, &g));
        assert!(logits(&off, &ids) == logits(&base(), &ids), "adapters off is the base exactly");
    }
    // Written by opsa in PEFT's format, read back: the same tensors, PEFT's names and layouts.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("adapter");
    save_adapter(&m, &cfg, "tests/fixtures/qwen3-tiny", &out, false).unwrap();
    let bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").unwrap().shape(), &[4, 64]);
    assert_eq!(st.tensor("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight").unwrap().shape(), &[64, 4]);
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((json["peft_type"].as_str(), json["task_type"].as_str(), json["r"].as_u64()), (Some("LORA"), Some("CAUSAL_LM"), Some(4)));
    let (again, cfg2) = load_adapter(base(), &out, &fixture("qwen3-tiny"), DType::F32).unwrap();
    assert_eq!(cfg, cfg2);
    for ids in inputs() {
        assert!(logits(&again, &ids) == logits(&m, &ids));
    }
    // Never over a user's folder unasked.
    assert!(save_adapter(&m, &cfg, "x", &out, false).unwrap_err().to_string().contains("already exists"));
}

#[test]
fn only_the_adapters_get_gradients() {
    let dev = Default::default();
    let m = load_model::<B>(&fixture("qwen3-tiny"), &LoadOptions::default(), &dev).unwrap().0;
    let m = m.freeze().with_new_adapters(&lora(4, 8.0, &["q_proj", "down_proj"]), 1, DType::F32);
    let x = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64, 5, 9, 3], [1, 4]), &dev);
    let grads = m.forward(x).square().mean().backward();
    let g = GradientsParams::from_grads(grads, &m);
    // 2 layers × 2 modules × (A, B).
    assert_eq!(g.len(), 2 * 2 * 2);
}


const LORA_SETS: &[&str] = &["lora.r=8", "lora.alpha=16", "lora.target_modules=[\"q_proj\",\"k_proj\",\"v_proj\",\"o_proj\",\"gate_proj\",\"up_proj\",\"down_proj\"]"];

#[test]
fn lora_opsa_lowers_held_out_divergence_and_writes_peft_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sets = vec!["train.steps=24", "train.save_every=0", "rollout.max_new_tokens=10", "optim.lr=2e-2", "model.save_dtype=\"f32\""];
    sets.extend_from_slice(LORA_SETS);
    let cfg = config(tmp.path(), &sets).unwrap();
    let dev = Default::default();
    let tok = HfTokenizer::from_dir(&cfg.model.path).unwrap();
    let pairs = held_out(&cfg, &tok);
    let div = cfg.divergence.divergence().unwrap();
    let greedy = SamplingParams { max_new_tokens: 10, ..Default::default() };
    let teacher = base();
    let before = mean_divergence(&teacher, &teacher, &tok, &pairs, &greedy, &div).unwrap();
    let final_dir = train_opsa::<B>(&cfg, false, &RunControl::default(), &dev).unwrap();
    let (merged, _) = load_model::<NdArray>(&final_dir, &LoadOptions::default(), &dev).unwrap();
    let after = mean_divergence(&merged, &teacher, &tok, &pairs, &greedy, &div).unwrap();
    eprintln!("LoRA OPSA held-out divergence {before:.4} -> {after:.4}");
    assert!(after <= 0.5 * before, "held-out divergence {before:.4} → {after:.4}: did not fall by half");
    // RUN/adapter on the base gives RUN/final's logits.
    let (unmerged, _) = load_adapter(base(), &tmp.path().join("adapter"), &cfg.model.path, DType::F32).unwrap();
    for ids in inputs() {
        let d = max_abs_diff(&logits(&unmerged, &ids), &logits(&merged, &ids));
        assert!(d < 1e-4, "RUN/adapter vs RUN/final: {d}");
    }
    // The norms and the embedding were frozen: final/ holds them unchanged.
    let (b, f) = (hf_tensors(&teacher), hf_tensors(&merged));
    for (x, y) in b.iter().zip(&f) {
        if x.name.contains("norm") || x.name.contains("embed") {
            assert!(x.data == y.data, "{} changed", x.name);
        }
    }
}

fn adapter_tensors(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<u8>)> = st.tensors().into_iter().map(|(n, t)| (n, t.data().to_vec())).collect();
    v.sort();
    v
}

#[test]
fn lora_resume_equals_an_uninterrupted_run() {
    let dev = Default::default();
    let a = tempfile::tempdir().unwrap();
    train_opsa::<B>(&config(a.path(), LORA_SETS).unwrap(), false, &RunControl::default(), &dev).unwrap();
    let b = tempfile::tempdir().unwrap();
    let cfg_b = config(b.path(), LORA_SETS).unwrap();
    train_opsa::<B>(&cfg_b, false, &RunControl { stop_after: Some(3), ..Default::default() }, &dev).unwrap();
    // A LoRA checkpoint holds the adapter and the optimiser state, not the model.
    let ckpt = b.path().join("checkpoints/step-000003");
    assert!(ckpt.join("adapter/adapter_config.json").is_file() && !ckpt.join("model").exists());
    train_opsa::<B>(&cfg_b, true, &RunControl::default(), &dev).unwrap();
    let (ta, tb) = (adapter_tensors(&a.path().join("adapter")), adapter_tensors(&b.path().join("adapter")));
    assert_eq!(ta.len(), 2 * 2 * 7);
    for ((na, da), (nb, db)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb);
        assert!(da == db, "{na} differs between the uninterrupted and the resumed run");
    }
}

#[test]
fn bad_lora_config_names_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    for (set, want) in [
        ("lora.r=0", "lora.r must be positive"),
        ("lora.alpha=0", "lora.alpha must be > 0"),
        ("lora.dropout=1.0", "lora.dropout must lie in [0, 1)"),
        ("lora.target_modules=[\"qkv\"]", "lora.target_modules: unknown module `qkv`"),
        ("lora.target_modules=[]", "lora.target_modules is empty"),
    ] {
        let mut sets: Vec<&str> = LORA_SETS.to_vec();
        sets.push(set);
        let err = config(tmp.path(), &sets).unwrap_err().to_string();
        assert!(err.contains(want), "{set}: {err}");
    }
    // An absent field: serde names it.
    let err = config(tmp.path(), &["lora.r=4", "lora.alpha=8"]).unwrap_err().to_string();
    assert!(err.contains("target_modules"), "{err}");
}

/// The fixture adapter copied with its config edited.
fn edited_adapter(edit: impl Fn(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixture("lora-qwen3-tiny").join(f), dir.path().join(f)).unwrap();
    }
    let p = dir.path().join("adapter_config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
    dir
}

#[test]
fn bad_adapter_names_the_field_before_any_work() {
    for (key, value, want) in [
        ("use_dora", serde_json::json!(true), "use_dora = true: DoRA is not implemented"),
        ("use_rslora", serde_json::json!(true), "use_rslora = true"),
        ("bias", serde_json::json!("all"), "bias = \"all\""),
        ("modules_to_save", serde_json::json!(["lm_head"]), "modules_to_save is set"),
        ("r", serde_json::json!(0), "r must be positive"),
        ("lora_alpha", serde_json::json!(-1.0), "lora_alpha must be > 0"),
        ("target_modules", serde_json::json!(["embed_tokens"]), "unknown module `embed_tokens`"),
        ("target_modules", serde_json::json!(".*proj"), "regular expression is not supported"),
        ("peft_type", serde_json::json!("IA3"), "only LORA"),
        ("base_model_name_or_path", serde_json::json!("meta-llama/Llama-3.1-8B"), "base_model_name_or_path"),
    ] {
        let dir = edited_adapter(|v| v[key] = value.clone());
        let err = load_adapter(base(), dir.path(), &fixture("qwen3-tiny"), DType::F32).unwrap_err().to_string();
        assert!(err.contains(want), "{key}: {err}");
    }
    // Shapes that do not fit the base: the qwen3-tiny adapter on the llama fixture.
    let m = load_model::<NdArray>(&fixture("llama-tiny"), &LoadOptions::default(), &Default::default()).unwrap().0;
    let dir = edited_adapter(|v| v["base_model_name_or_path"] = serde_json::Value::Null);
    let err = load_adapter(m, dir.path(), &fixture("llama-tiny"), DType::F32).map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("does not fit the base model") || err.contains("missing"), "{err}");
    // The CLI: one error line naming the field, non-zero exit, before loading anything.
    let dir = edited_adapter(|v| v["use_dora"] = serde_json::json!(true));
    let out = Command::new(env!("CARGO_BIN_EXE_opsa"))
        .current_dir(root())
        .args(["generate", "--model", "tests/fixtures/qwen3-tiny", "--prompt", "hi", "--adapter"])
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("use_dora") && !err.contains("panicked"), "{err}");
}

#[test]
fn cli_runs_an_adapter_unmerged_and_convert_merges_it() {
    let tmp = tempfile::tempdir().unwrap();
    let merged = tmp.path().join("merged");
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_opsa")).current_dir(root()).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    run(&["convert", "--model", "tests/fixtures/qwen3-tiny", "--adapter", "tests/fixtures/lora-qwen3-tiny", "--out", merged.to_str().unwrap(), "--dtype", "f32"]);
    let score = |model: &str, adapter: Option<&str>| -> Vec<f64> {
        let mut args = vec!["score", "--model", model, "--prompt", "The cat", "--response", " sat on the mat", "--json"];
        if let Some(a) = adapter {
            args.extend(["--adapter", a]);
        }
        let v: serde_json::Value = serde_json::from_str(&run(&args)).unwrap();
        v["logprobs"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
    };
    let unmerged = score("tests/fixtures/qwen3-tiny", Some("tests/fixtures/lora-qwen3-tiny"));
    let m = score(merged.to_str().unwrap(), None);
    let plain = score("tests/fixtures/qwen3-tiny", None);
    let d = unmerged.iter().zip(&m).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(d < 1e-4, "score --adapter vs the converted model: {d}");
    assert!(unmerged.iter().zip(&plain).any(|(a, b)| (a - b).abs() > 1e-3), "the adapter changes the scores");
    let g = run(&["generate", "--model", "tests/fixtures/qwen3-tiny", "--adapter", "tests/fixtures/lora-qwen3-tiny", "--prompt", "The cat", "--max-new-tokens", "4", "--json"]);
    assert!(!g.trim().is_empty());
}

#[test]
fn plan_counts_one_frozen_base_and_only_the_adapters_state() {
    // (cargo runs the tests in the package root: the recipes' relative context files resolve.)
    let full = opsa_train::TrainConfig::load(
        &root().join("configs/opsa-r1-distill-llama-8b.toml"),
        &["model.path=\"configs/shapes/r1-distill-llama-8b\"".into()],
    );
    let lora = opsa_train::TrainConfig::load(
        &root().join("configs/opsa-r1-distill-llama-8b-lora.toml"),
        &["model.path=\"configs/shapes/r1-distill-llama-8b\"".into()],
    );
    let (full, lora) = (full.unwrap(), lora.unwrap());
    let (pf, pl) = (opsa_train::plan::memory_plan(&full, 256).unwrap(), opsa_train::plan::memory_plan(&lora, 256).unwrap());
    // r 16 on all seven projections of 32 layers: 16 · (in + out) summed.
    assert_eq!(pl.trainable, 41_943_040);
    assert!(pl.train.iter().all(|i| i.what != "teacher weights"));
    let base = pl.train.iter().find(|i| i.what == "base weights (frozen)").unwrap();
    assert_eq!(base.bytes, 2 * pl.parameters);
    assert!(pl.train_total() * 5 < pf.train_total(), "{} vs {}", pl.train_total(), pf.train_total());
    assert!(pl.render().contains("LoRA: 41.9M trainable"));
}

/// f32 values of an adapter folder's tensors, by name.
fn adapter_values(dir: &Path) -> Vec<(String, Vec<f32>)> {
    adapter_tensors(dir).into_iter().map(|(n, b)| (n, b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())).collect()
}

/// Two LoRA OPSA runs of `steps` steps, the second with `second` set too: their adapters.
fn two_runs(steps: &str, second: &str) -> (Vec<(String, Vec<f32>)>, Vec<(String, Vec<f32>)>, tempfile::TempDir) {
    let dev = Default::default();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut sets = LORA_SETS.to_vec();
    sets.extend([steps, "optim.lr=2e-2"]);
    train_opsa::<B>(&config(a.path(), &sets).unwrap(), false, &RunControl::default(), &dev).unwrap();
    sets.push(second);
    train_opsa::<B>(&config(b.path(), &sets).unwrap(), false, &RunControl::default(), &dev).unwrap();
    (adapter_values(&a.path().join("adapter")), adapter_values(&b.path().join("adapter")), b)
}

#[test]
fn lora_with_recompute_trains_the_same_adapters() {
    let (a, b, re) = two_runs("train.steps=3", "train.recompute=true");
    let mut moved = false;
    for ((n, x), (_, y)) in a.iter().zip(&b) {
        let d = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(d < 1e-6, "{n}: recompute changed the trained adapter by {d}");
        moved |= n.contains("lora_B") && x.iter().any(|&v| v != 0.0);
    }
    assert!(moved, "the adapters trained");
    // dropout > 0 with recompute: refused up front.
    let mut sets = LORA_SETS.to_vec();
    sets.extend(["train.recompute=true", "lora.dropout=0.1"]);
    let err = config(re.path(), &sets).unwrap_err().to_string();
    assert!(err.contains("lora.dropout > 0 with train.recompute"), "{err}");
}

#[test]
fn lora_dropout_acts_in_training_only() {
    let (x, y, b) = two_runs("train.steps=2", "lora.dropout=0.5");
    assert!(x != y, "dropout changed nothing");
    // At inference the adapter with dropout 0.5 is deterministic: two forwards agree.
    let (m, cfg) = load_adapter(base(), &b.path().join("adapter"), &fixture("qwen3-tiny"), DType::F32).unwrap();
    assert_eq!(cfg.dropout, 0.5);
    let x = &inputs()[0];
    assert!(logits(&m, x) == logits(&m, x));
}
