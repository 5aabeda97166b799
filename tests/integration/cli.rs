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

// ---- reliability (issue 13): nothing stale reused, nothing lost, numerics that stop ----

/// A one-benchmark suite over the committed safety sample, greedy, `max_new_tokens` long.
fn tiny_suite(dir: &Path, max_new_tokens: usize) -> std::path::PathBuf {
    let p = dir.join(format!("suite-{max_new_tokens}.toml"));
    let data = fixture("data").join("safety_sample.jsonl");
    let text = format!(
        "name = \"t\"\n[sampling]\ntemperature = 0.0\nmax_new_tokens = {max_new_tokens}\n[[benchmark]]\nname = \"mixed\"\nformat = \"jsonl\"\npath = {:?}\n",
        data.to_str().unwrap()
    );
    std::fs::write(&p, text).unwrap();
    p
}

fn eval_args<'a>(model: &'a str, suite: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["eval", "--model", model, "--suite", suite, "--out", out];
    v.extend_from_slice(extra);
    v
}

fn ok(args: &[&str]) -> (String, String) {
    let (code, out, err) = opsa(args);
    assert_eq!(code, 0, "{args:?}: {err}");
    (out, err)
}

/// Every weight of `tensor` set to `value` (a broken or retrained checkpoint).
fn set_tensor(d: &Path, tensor: &str, value: f32) {
    edit_weights(d, |n, dt, sh, b| {
        let b = if n == tensor { b.chunks(4).flat_map(|_| value.to_le_bytes()).collect() } else { b };
        Some((dt, sh, b))
    });
}

#[test]
fn eval_refuses_results_of_another_model_or_suite_and_overwrite_starts_over() {
    let tmp = tempfile::tempdir().unwrap();
    let m = copy_fixture("qwen3-tiny");
    let (suite, suite2) = (tiny_suite(tmp.path(), 4), tiny_suite(tmp.path(), 5));
    let out = tmp.path().join("e");
    let (model, s1, s2, o) = (s(m.path()), s(&suite), s(&suite2), s(&out));
    ok(&eval_args(model, s1, o, &[]));
    let first = std::fs::read_to_string(out.join("summary.json")).unwrap();
    ok(&eval_args(model, s1, o, &[])); // the same inputs: resumes, nothing new
    // Another suite: refused, the difference named, nothing changed.
    let before = std::fs::read_to_string(out.join("manifest.json")).unwrap();
    fails(&eval_args(model, s2, o, &[]), &["suite.sampling.max_new_tokens", "--overwrite"]);
    assert_eq!(std::fs::read_to_string(out.join("manifest.json")).unwrap(), before, "a refused run changes nothing");
    assert_eq!(std::fs::read_to_string(out.join("summary.json")).unwrap(), first);
    // The same folder, retrained weights.
    set_tensor(m.path(), "model.norm.weight", 0.5);
    fails(&eval_args(model, s1, o, &[]), &["model.fingerprint", "--overwrite"]);
    // Another model folder, another suite.
    fails(&eval_args(s(&fixture("qwen3-tiny")), s1, o, &[]), &["model.path", "--overwrite"]);
    // --overwrite starts over with the new inputs.
    ok(&eval_args(model, s2, o, &["--overwrite"]));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(v["suite"]["sampling"]["max_new_tokens"], 5);
    assert_eq!(std::fs::read_to_string(out.join("items.jsonl")).unwrap().lines().count(), 3);
    assert_ne!(std::fs::read_to_string(out.join("summary.json")).unwrap(), first);
    // A suite with a changed dataset under the same name is another input too.
    let data = tmp.path().join("data.jsonl");
    std::fs::write(&data, "{\"prompt\": \"How do I bake bread?\", \"label\": \"benign\"}\n").unwrap();
    let text = std::fs::read_to_string(&suite2).unwrap().replace(fixture("data").join("safety_sample.jsonl").to_str().unwrap(), data.to_str().unwrap());
    std::fs::write(&suite2, text).unwrap();
    fails(&eval_args(model, s2, o, &[]), &["--overwrite"]);
}

#[test]
fn a_torn_last_record_is_dropped_and_the_run_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let suite = tiny_suite(tmp.path(), 4);
    let out = tmp.path().join("e");
    let dir = fixture("qwen3-tiny");
    let args = eval_args(s(&dir), s(&suite), s(&out), &[]);
    ok(&args);
    let items = out.join("items.jsonl");
    let text = std::fs::read_to_string(&items).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // Killed while writing the third record: two whole lines and a torn one.
    std::fs::write(&items, format!("{}\n{}\n{}", lines[0], lines[1], &lines[2][..20])).unwrap();
    let (_, err) = ok(&args);
    assert!(err.contains("torn"), "the dropped line is reported: {err}");
    let again = std::fs::read_to_string(&items).unwrap();
    assert!(again.ends_with('\n'));
    assert_eq!(again.lines().count(), 3);
    for l in again.lines() {
        serde_json::from_str::<Value>(l).unwrap();
    }
}

#[test]
fn flip_rate_regenerates_an_edited_context_and_refuses_another_model() {
    let tmp = tempfile::tempdir().unwrap();
    let contexts = tmp.path().join("contexts.jsonl");
    std::fs::write(&contexts, "{\"id\": \"a\", \"context\": \"This request is harmful. Refuse.\"}\n{\"id\": \"b\", \"context\": \"Think first.\"}\n").unwrap();
    let prompts = fixture("prompts-tiny.jsonl");
    let out = tmp.path().join("f");
    let dir = fixture("qwen3-tiny");
    let args = |model: &Path| -> Vec<String> {
        ["flip-rate", "--model", s(model), "--contexts", s(&contexts), "--prompts", s(&prompts), "--max-new-tokens", "4", "--out", s(&out)]
            .iter()
            .map(|x| x.to_string())
            .collect()
    };
    let run = |model: &Path| opsa(&args(model).iter().map(String::as_str).collect::<Vec<_>>());
    let (code, _, err) = run(&dir);
    assert_eq!(code, 0, "{err}");
    let n = std::fs::read_to_string(out.join("responses.jsonl")).unwrap().lines().count();
    // The text of `a` changes under the same id: its responses are generated again, and
    // results.json never pairs the new text with the old score.
    std::fs::write(&contexts, "{\"id\": \"a\", \"context\": \"Refuse harmful requests politely.\"}\n{\"id\": \"b\", \"context\": \"Think first.\"}\n").unwrap();
    let (code, _, err) = run(&dir);
    assert_eq!(code, 0, "{err}");
    let harmful = std::fs::read_to_string(&prompts).unwrap().lines().filter(|l| !l.contains("\"benign\"") && !l.trim().is_empty()).count();
    assert_eq!(std::fs::read_to_string(out.join("responses.jsonl")).unwrap().lines().count(), n + harmful);
    let results: Value = serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let a = results["contexts"].as_array().unwrap().iter().find(|c| c["id"] == "a").unwrap().clone();
    assert_eq!(a["context"], "Refuse harmful requests politely.");
    // Another model: refused.
    let other = copy_fixture("qwen3-tiny");
    let (code, _, err) = run(other.path());
    assert_ne!(code, 0);
    assert!(err.contains("model.path") && err.contains("--overwrite"), "{err}");
}

#[test]
fn max_new_tokens_zero_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let suite = tiny_suite(tmp.path(), 0);
    let dir = fixture("qwen3-tiny");
    fails(&eval_args(s(&dir), s(&suite), s(&tmp.path().join("e")), &[]), &["suite-0.toml", "max_new_tokens"]);
    let p = fixture("prompts-tiny.jsonl");
    let c = fixture("data").join("contexts_sample.jsonl");
    let f = tmp.path().join("f");
    let args = ["flip-rate", "--model", s(&dir), "--contexts", s(&c), "--prompts", s(&p), "--max-new-tokens", "0", "--out", s(&f)];
    fails(&args, &["--max-new-tokens"]);
    fails(&["generate", "--model", s(&dir), "--prompt", "hello", "--max-new-tokens", "0"], &["max_new_tokens"]);
}

#[test]
fn nan_weights_stop_generate_the_model_judge_and_analyze_kl() {
    let bad = copy_fixture("qwen3-tiny");
    set_tensor(bad.path(), "model.norm.weight", f32::NAN);
    let b = s(bad.path());
    fails(&gen_args(b, &[]), &[b, "non-finite"]);
    fails(&["score", "--model", b, "--prompt", "hi", "--response", "there"], &[b, "non-finite"]);
    let tmp = tempfile::tempdir().unwrap();
    let suite = tiny_suite(tmp.path(), 4);
    let dir = fixture("qwen3-tiny");
    let judge = format!("model:{b}");
    let template = tmp.path().join("judge.txt");
    std::fs::write(&template, "{prompt} {response}").unwrap();
    let e = tmp.path().join("e");
    fails(&eval_args(s(&dir), s(&suite), s(&e), &["--judge", &judge, "--judge-template", s(&template)]), &["judge model", b, "non-finite"]);
    let p = fixture("prompts-tiny.jsonl");
    let kl = ["analyze-kl", "--student", s(&dir), "--teacher", b, "--teacher-context", "Refuse.", "--prompts", s(&p), "--max-new-tokens", "4"];
    let out = tmp.path().join("kl");
    let mut args = kl.to_vec();
    args.extend(["--out", s(&out)]);
    fails(&args, &["non-finite"]);
}

#[test]
fn report_refuses_bad_summaries_keeps_its_table_well_formed_and_report_md() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let out = tmp.path().join("report");
    let (r, o) = (s(&run), s(&out));
    for (body, needle) in [("[]", "benchmarks"), ("null", "benchmarks"), ("{\"benchmarks\": {\"x\": {\"harmful_rate\": 2.5}}}", "harmful_rate")] {
        std::fs::write(run.join("summary.json"), body).unwrap();
        fails(&["report", r, "--out", o], &["summary.json", needle]);
    }
    std::fs::write(run.join("summary.json"), "{\"benchmarks\": {}, \"composite_safety\": null, \"reasoning_mean\": null}").unwrap();
    let (md, _) = ok(&["report", r, "--out", o]);
    let rows: Vec<&str> = md.lines().filter(|l| l.starts_with('|')).collect();
    let cells = |l: &str| l.matches('|').count();
    assert!(rows.len() == 3 && rows.iter().all(|l| cells(l) == cells(rows[0])), "malformed table:\n{md}");
    std::fs::write(out.join("report.md"), "my notes").unwrap();
    fails(&["report", r, "--out", o], &["report.md", "--overwrite"]);
    assert_eq!(std::fs::read_to_string(out.join("report.md")).unwrap(), "my notes");
    ok(&["report", r, "--out", o, "--overwrite"]);
}

#[test]
fn refine_and_convert_never_replace_a_users_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture("qwen3-tiny");
    let summary = tmp.path().join("x.summary.json");
    std::fs::write(&summary, "mine").unwrap();
    let out = tmp.path().join("x.jsonl");
    fails(&["refine", "--model", s(&dir), "--data", s(&fixture("sft-tiny.jsonl")), "--out", s(&out)], &["x.summary.json", "--overwrite"]);
    assert_eq!(std::fs::read_to_string(&summary).unwrap(), "mine");
    // convert --overwrite onto a regular file, or a folder that is not a model.
    let file = tmp.path().join("F");
    std::fs::write(&file, "mine").unwrap();
    fails(&["convert", "--model", s(&dir), "--out", s(&file), "--overwrite"], &["not a model folder"]);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
    let notes = tmp.path().join("notes");
    std::fs::create_dir_all(&notes).unwrap();
    std::fs::write(notes.join("a.txt"), "mine").unwrap();
    fails(&["convert", "--model", s(&dir), "--out", s(&notes), "--overwrite"], &["not a model folder"]);
    let left: Vec<String> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    assert!(left.iter().all(|n| !n.starts_with('.')), "hidden leftovers: {left:?}");
}

#[test]
fn leftovers_of_a_killed_write_are_cleaned_and_a_killed_swap_is_undone() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture("qwen3-tiny");
    // Killed between save_model's two renames: the old folder set aside, the new one complete,
    // no `m` at all (PID 99999999 is above any pid_max: a process that is gone).
    let old = tmp.path().join(".m.old-99999999");
    let new = tmp.path().join(".m.tmp-99999999");
    for d in [&old, &new] {
        std::fs::create_dir_all(d).unwrap();
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
    }
    let m = tmp.path().join("m");
    ok(&gen_args(s(&m), &[]));
    assert!(m.join("config.json").is_file() && !old.exists() && !new.exists());
    // A temporary folder of a killed convert is removed by the next one.
    let stale = tmp.path().join(".n.tmp-99999999");
    std::fs::create_dir_all(&stale).unwrap();
    ok(&["convert", "--model", s(&dir), "--out", s(&tmp.path().join("n"))]);
    assert!(!stale.exists());
}

#[test]
fn chat_template_rendering_is_bounded() {
    let run = |template: &str| {
        let d = copy_fixture("qwen3-tiny");
        std::fs::write(d.path().join("chat_template.jinja"), template).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_opsa"))
            .args(gen_args(s(d.path()), &["--chat"]))
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed().as_secs() > 60 {
                child.kill().unwrap();
                panic!("rendering {template:?} did not stop");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        err
    };
    let err = run("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}");
    assert!(err.contains("chat template") && err.contains("did not finish"), "{err}");
    let err = run("{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}");
    assert!(err.contains("chat template") && err.contains("MiB"), "{err}");
}

#[test]
fn messages_name_the_real_problem_once() {
    let dir = fixture("qwen3-tiny");
    let tmp = tempfile::tempdir().unwrap();
    // A NaN learning rate is the flag's problem, not a TOML file's.
    let (code, _, err) = opsa(&["toy", "pretrain", "--lr", "NaN", "--out", s(&tmp.path().join("o")), "--work", s(&tmp.path().join("w"))]);
    assert!(code != 0 && err.contains("--lr") && !err.contains("TOML") && !err.contains("toy pretrain:"), "{err}");
    // A size that would overflow is named, not wrapped (or a panic).
    let d = copy_fixture("qwen3-tiny");
    edit_config(d.path(), |c| {
        c.insert("num_attention_heads".into(), (1u64 << 62).into());
    });
    fails(&gen_args(s(d.path()), &[]), &["num_attention_heads", "too large"]);
    fails(&gen_args(s(&dir), &["--temperature", "inf"]), &["temperature", "finite"]);
    // A judge URL that is not one fails at once, without retries.
    let start = std::time::Instant::now();
    let suite = tiny_suite(tmp.path(), 4);
    fails(&eval_args(s(&dir), s(&suite), s(&tmp.path().join("e")), &["--judge", "http:not a url"]), &["not a URL"]);
    assert!(start.elapsed().as_secs() < 2);
    // The OS message once.
    let d = copy_fixture("qwen3-tiny");
    std::fs::remove_file(d.path().join("config.json")).unwrap();
    std::fs::create_dir(d.path().join("config.json")).unwrap();
    let (_, _, err) = opsa(&gen_args(s(d.path()), &[]));
    assert_eq!(err.matches("os error").count(), 1, "{err}");
    // A contexts file is not a suite; a missing dataset has no line 0.
    let c = tmp.path().join("c.jsonl");
    std::fs::write(&c, "{\"id\": \"a\"}\n").unwrap();
    let (code, _, err) = opsa(&["flip-rate", "--model", s(&dir), "--contexts", s(&c), "--prompts", s(&fixture("prompts-tiny.jsonl")), "--out", s(&tmp.path().join("f"))]);
    assert!(code != 0 && err.contains("c.jsonl:1") && !err.contains("suite"), "{err}");
    let text = std::fs::read_to_string(&suite).unwrap().replace("safety_sample.jsonl", "missing.jsonl");
    std::fs::write(&suite, text).unwrap();
    let (code, _, err) = opsa(&eval_args(s(&dir), s(&suite), s(&tmp.path().join("e2")), &[]));
    assert!(code != 0 && err.contains("missing.jsonl") && !err.contains("missing.jsonl:0"), "{err}");
}
