//! The `opsa` binary: JSON outputs, and one clear error line (no panic) for each kind of bad input.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::common::*;

fn opsa(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_opsa")).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a command that must fail: non-zero exit, an `error:` line containing every `needle`,
/// and no panic.
fn fails(args: &[&str], needles: &[&str]) {
    let (code, _, err) = opsa(args);
    assert_ne!(code, 0, "{args:?} should fail; stderr: {err}");
    assert!(!err.contains("panicked") && !err.contains("internal error"), "{args:?} panicked: {err}");
    let line = err.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("no error line: {err}"));
    for n in needles {
        assert!(line.contains(n), "{args:?}: error line {line:?} should mention {n:?}");
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn generate_json_has_every_field_and_matches_transformers() {
    let dir = fixture("qwen2-tiny");
    let r = reference("qwen2-tiny");
    let (code, out, err) =
        opsa(&["generate", "--model", s(&dir), "--prompt", "What is 17*23?", "--max-new-tokens", "24", "--temperature", "0", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    for key in ["prompt", "prompt_ids", "token_ids", "text", "logprobs", "finish_reason"] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    assert_eq!(ids(&v["prompt_ids"]), ids(&r["greedy"][0]["prompt_ids"]));
    assert_eq!(ids(&v["token_ids"]), ids(&r["greedy"][0]["new_ids"]));
    assert_eq!(v["logprobs"].as_array().unwrap().len(), 24);
    assert_eq!(v["finish_reason"], "length");
}

#[test]
fn generate_chat_uses_the_template_and_sampling_is_seeded() {
    let dir = fixture("qwen3-tiny");
    let r = reference("qwen3-tiny");
    let args = [
        "generate", "--model", s(&dir), "--prompt", "What is 17*23?", "--chat", "--max-new-tokens", "16",
        "--temperature", "0.6", "--top-p", "0.95", "--top-k", "20", "--seed", "7", "--json",
    ];
    let (code, a, err) = opsa(&args);
    assert_eq!(code, 0, "{err}");
    let (_, b, _) = opsa(&args);
    assert_eq!(a, b, "same seed, same output");
    let v: Value = serde_json::from_str(a.trim()).unwrap();
    assert_eq!(ids(&v["prompt_ids"]), ids(&r["chats"][0]["ids"]));
}

#[test]
fn prompts_file_batches_keep_order_and_results() {
    let dir = fixture("qwen3-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("prompts.jsonl");
    let prompts = ["What is 17*23?", "Hello", "Add 12 and 30, then subtract 2.", "hi there"];
    let body: String = prompts.iter().map(|p| format!("{}\n", serde_json::json!({ "prompt": p, "label": "benign" }))).collect();
    std::fs::write(&file, body).unwrap();
    let run = |bs: &str| {
        let (code, out, err) = opsa(&[
            "generate", "--model", s(&dir), "--prompts-file", s(&file), "--batch-size", bs, "--max-new-tokens", "8",
            "--temperature", "1.0", "--seed", "3", "--json",
        ]);
        assert_eq!(code, 0, "{err}");
        out.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()).collect::<Vec<_>>()
    };
    let (one, three) = (run("1"), run("3"));
    assert_eq!(one.len(), 4);
    for (i, (a, b)) in one.iter().zip(&three).enumerate() {
        assert_eq!(a["prompt"], prompts[i]);
        assert_eq!(a["token_ids"], b["token_ids"], "row {i} depends on the batch size");
    }
}

#[test]
fn score_tokenises_prompt_and_response_separately() {
    let dir = fixture("qwen3-tiny");
    let (code, out, err) = opsa(&["score", "--model", s(&dir), "--prompt", "What is", "--response", " 17*23?", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    let tok = opsa_models::HfTokenizer::from_dir(&dir).unwrap();
    assert_eq!(ids(&v["prompt_ids"]), tok.encode("What is", false).unwrap());
    assert_eq!(ids(&v["response_ids"]), tok.encode(" 17*23?", false).unwrap());
    let lps: Vec<f64> = v["logprobs"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(lps.len(), ids(&v["response_ids"]).len());
    assert!(lps.iter().all(|&x| x < 0.0 && x.is_finite()));
    // With --chat the prompt ids are the rendered template's.
    let (code, out, _) = opsa(&["score", "--model", s(&dir), "--prompt", "What is 17*23?", "--response", "391", "--chat", "--json"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(ids(&v["prompt_ids"]), ids(&reference("qwen3-tiny")["chats"][0]["ids"]));
}

#[test]
fn help_explains_every_flag() {
    for sub in ["generate", "score"] {
        let (code, out, _) = opsa(&[sub, "--help"]);
        assert_eq!(code, 0);
        for flag in ["--model", "--backend", "--dtype", "--chat", "--json"] {
            assert!(out.contains(flag), "{sub} --help lacks {flag}");
        }
    }
}

// ---- bad input ----

fn gen_args<'a>(dir: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["generate", "--model", dir, "--prompt", "hello", "--max-new-tokens", "2"];
    v.extend_from_slice(extra);
    v
}

#[test]
fn missing_folder() {
    fails(&gen_args("/nonexistent/model", &[]), &["/nonexistent/model", "does not exist"]);
}

#[test]
fn malformed_config() {
    let d = copy_fixture("qwen3-tiny");
    std::fs::write(d.path().join("config.json"), "{ not json").unwrap();
    fails(&gen_args(s(d.path()), &[]), &["config.json", "invalid JSON"]);
}

fn edit_config(d: &Path, f: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let p = d.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(&p, v.to_string()).unwrap();
}

#[test]
fn unsupported_options_are_rejected_at_load() {
    let d = copy_fixture("qwen3-tiny");
    edit_config(d.path(), |c| {
        c.insert("model_type".into(), "gemma2".into());
    });
    fails(&gen_args(s(d.path()), &[]), &["config.json", "model_type `gemma2`", "`llama`"]);
    let d = copy_fixture("qwen3-tiny");
    edit_config(d.path(), |c| {
        c.insert("rope_parameters".into(), serde_json::json!({"rope_type": "yarn", "factor": 4.0}));
    });
    fails(&gen_args(s(d.path()), &[]), &["config.json", "yarn"]);
    let d = copy_fixture("qwen2-tiny");
    edit_config(d.path(), |c| {
        c.insert("layer_types".into(), serde_json::json!(["full_attention", "sliding_attention"]));
    });
    fails(&gen_args(s(d.path()), &[]), &["config.json", "sliding_attention"]);
}

/// Rewrite qwen3-tiny's model.safetensors through `f(name, dtype, shape, bytes)`.
fn edit_weights(d: &Path, f: impl Fn(&str, safetensors::Dtype, Vec<usize>, Vec<u8>) -> Option<(safetensors::Dtype, Vec<usize>, Vec<u8>)>) {
    let p = d.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .filter_map(|(n, v)| f(&n, v.dtype(), v.shape().to_vec(), v.data().to_vec()).map(|(dt, sh, b)| (n, dt, sh, b)))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = kept
        .iter()
        .map(|(n, dt, sh, b)| (n.clone(), safetensors::tensor::TensorView::new(*dt, sh.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &p).unwrap();
}

#[test]
fn missing_misshaped_and_wrong_dtype_tensors_are_named() {
    let target = "model.layers.1.self_attn.k_norm.weight";
    let d = copy_fixture("qwen3-tiny");
    edit_weights(d.path(), |n, dt, sh, b| if n == target { None } else { Some((dt, sh, b)) });
    fails(&gen_args(s(d.path()), &[]), &[target, "missing"]);

    let d = copy_fixture("qwen3-tiny");
    edit_weights(d.path(), |n, dt, sh, b| Some((dt, if n == target { vec![16, 2] } else { sh }, b)));
    fails(&gen_args(s(d.path()), &[]), &[target, "[16, 2]", "[32]"]);

    let d = copy_fixture("qwen3-tiny");
    edit_weights(d.path(), |n, dt, sh, b| Some((if n == target { safetensors::Dtype::I16 } else { dt }, sh, b)));
    fails(&gen_args(s(d.path()), &[]), &[target, "unsupported dtype"]);
}

#[test]
fn tokenizer_larger_than_model_vocab() {
    let d = copy_fixture("qwen3-tiny");
    edit_config(d.path(), |c| {
        c.insert("vocab_size".into(), 300.into());
    });
    fails(&gen_args(s(d.path()), &[]), &["vocab_size is 300", "do not match"]);
}

#[test]
fn bad_generation_arguments() {
    let dir = fixture("qwen3-tiny");
    let dir = s(&dir);
    fails(&["generate", "--model", dir, "--prompt", ""], &["empty"]);
    fails(&gen_args(dir, &["--temperature", "1", "--top-p", "0"]), &["top-p", "(0, 1]"]);
    fails(&gen_args(dir, &["--temperature", "1", "--top-p", "1.5"]), &["top-p", "(0, 1]"]);
    let long = "word ".repeat(400);
    fails(&["generate", "--model", dir, "--prompt", &long], &["max_position_embeddings (256)"]);
    fails(&gen_args(dir, &["--dtype", "f64"]), &[]);
    // The CPU test backend holds no bf16 weights: a clear error, not a panic inside the backend.
    fails(&gen_args(dir, &["--dtype", "bf16", "--backend", "ndarray"]), &["bfloat16", "not supported by this backend"]);
}

#[test]
fn chat_without_template() {
    let d = copy_fixture("qwen3-tiny");
    std::fs::remove_file(d.path().join("chat_template.jinja")).unwrap();
    fails(&gen_args(s(d.path()), &["--chat"]), &["no chat template"]);
}

#[test]
fn malformed_prompts_file_names_the_line() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("p.jsonl");
    std::fs::write(&file, "{\"prompt\": \"ok\"}\n{\"text\": \"no prompt field\"}\n").unwrap();
    let dir = fixture("qwen3-tiny");
    fails(&["generate", "--model", s(&dir), "--prompts-file", s(&file)], &["p.jsonl:2", "prompt"]);
    std::fs::write(&file, "").unwrap();
    fails(&["generate", "--model", s(&dir), "--prompts-file", s(&file)], &["no prompts"]);
}
