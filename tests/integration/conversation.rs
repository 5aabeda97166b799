//! Multi-turn conversations (`"messages"` instead of `"prompt"`): the one JSONL reader, their
//! rendering against transformers' `apply_chat_template`, where the teacher's context goes, every
//! command that reads prompts, and one clear error per kind of bad input.

use std::path::{Path, PathBuf};
use std::process::Command;

use opsa_distill::{Contexts, Label, Placement};
use opsa_models::prompt::read_prompts;
use opsa_models::{ChatMessage, HfTokenizer, Prompt};
use serde_json::{json, Value};

use crate::common::*;

fn write(dir: &Path, name: &str, lines: &[Value]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    p
}

/// The reference conversations with more than one user turn (each with a past assistant turn
/// holding a `<think>` block) or a turn after the last assistant one.
fn multi_turn(name: &str) -> Vec<Value> {
    reference(name)["chats"].as_array().unwrap().iter().filter(|c| c["messages"].as_array().unwrap().len() > 2).cloned().collect()
}

#[test]
fn conversations_read_from_jsonl_render_as_transformers() {
    for name in FAMILIES {
        let tok = HfTokenizer::from_dir(&fixture(name)).unwrap();
        let chats = multi_turn(name);
        assert!(chats.len() >= 3, "{name}: {} multi-turn cases", chats.len());
        assert!(chats.iter().any(|c| c["messages"].to_string().contains("<think>")));
        let tmp = tempfile::tempdir().unwrap();
        let lines: Vec<Value> = chats.iter().map(|c| json!({ "messages": c["messages"], "label": "benign" })).collect();
        let file = write(tmp.path(), "chats.jsonl", &lines);
        let read = read_prompts(&file).unwrap();
        assert_eq!(read.len(), chats.len());
        for (line, c) in read.iter().zip(&chats) {
            assert!(matches!(line.prompt, Prompt::Messages(_)));
            let got = tok.encode_chat(&line.prompt.messages(), c["extra"].as_object().unwrap()).unwrap();
            assert_eq!(got, ids(&c["ids"]), "{name}: {}", c["messages"]);
        }
    }
}

/// R1 templates drop a past assistant turn's reasoning; Qwen3 drops it before the last user
/// query and keeps it after (the reference texts say so too; here it is spelled out).
#[test]
fn past_reasoning_renders_by_each_templates_rules() {
    for (name, case, kept) in [("qwen2-tiny", 2, false), ("qwen3-tiny", 2 * 2, false), ("qwen3-tiny", 2 * 4, true), ("llama-tiny", 4, false)] {
        let c = &reference(name)["chats"][case];
        let text = c["text"].as_str().unwrap();
        assert!(c["messages"].to_string().contains("<think>"), "{name} case {case}");
        assert_eq!(text.contains("12 + 30 = 42"), kept, "{name} case {case}: {text:?}");
    }
}

#[test]
fn the_context_goes_into_the_last_user_turn_or_the_system_message() {
    let conv = Prompt::Messages(vec![
        ChatMessage::system("Be brief."),
        ChatMessage::user("first"),
        ChatMessage::new("assistant", "<think>\nx\n</think>\n\nok"),
        ChatMessage::user("second"),
    ]);
    let ctx = |placement| Contexts { harmful: "CTX".into(), benign: "B".into(), placement, separator: "\n\n".into() };
    let pre = ctx(Placement::Prepend).teacher_messages(&conv, Label::Harmful);
    assert_eq!(pre.len(), 4);
    assert_eq!((pre[1].content.as_str(), pre[3].content.as_str()), ("first", "CTX\n\nsecond"));
    let app = ctx(Placement::Append).teacher_messages(&conv, Label::Harmful);
    assert_eq!(app[3].content, "second\n\nCTX");
    let sys = ctx(Placement::System).teacher_messages(&conv, Label::Harmful);
    assert_eq!(sys.len(), 4, "merged into the existing system message");
    assert_eq!(sys[0], ChatMessage::system("CTX\n\nBe brief."));
    assert_eq!(&sys[1..], &conv.messages()[1..]);
    // Without a system message of its own the context becomes one; a plain prompt as before.
    let plain = Prompt::from("q");
    assert_eq!(ctx(Placement::System).teacher_messages(&plain, Label::Benign), vec![ChatMessage::system("B"), ChatMessage::user("q")]);
    assert_eq!(ctx(Placement::Prepend).teacher_messages(&plain, Label::Benign), vec![ChatMessage::user("B\n\nq")]);
}

#[test]
fn training_prompts_and_eval_suites_accept_messages() {
    let tmp = tempfile::tempdir().unwrap();
    let conv = json!([{"role": "user", "content": "Add 12 and 30."}, {"role": "assistant", "content": "42"}, {"role": "user", "content": "And 42 - 2?"}]);
    let file = write(tmp.path(), "p.jsonl", &[json!({"prompt": "plain", "label": "harmful"}), json!({"messages": conv, "label": "benign", "answer": "40"})]);
    let train = opsa_train::data::read_prompts(&file).unwrap();
    assert_eq!(train[0].prompt, Prompt::from("plain"));
    assert_eq!((train[1].label, train[1].prompt.request()), (Label::Benign, "And 42 - 2?"));
    let items = opsa_eval::datasets::load("jsonl", &file).unwrap();
    assert_eq!(items[1].prompt, train[1].prompt);
    assert_eq!(opsa_train::data::read_prompt_list(&file).unwrap()[1], train[1].prompt);
}

fn opsa(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_opsa")).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn generate_and_score_take_conversations() {
    for name in ["qwen3-tiny", "llama-tiny"] {
        let dir = fixture(name);
        let c = &multi_turn(name)[0];
        let tmp = tempfile::tempdir().unwrap();
        let file = write(tmp.path(), "chats.jsonl", &[json!({ "messages": c["messages"] })]);
        let d = dir.to_str().unwrap();
        let (code, out, err) = opsa(&["generate", "--model", d, "--prompts-file", file.to_str().unwrap(), "--chat", "--max-new-tokens", "4", "--json"]);
        assert_eq!(code, 0, "{err}");
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(ids(&v["prompt_ids"]), ids(&c["ids"]), "{name}");
        assert_eq!(v["prompt"], c["messages"]);
        let m = c["messages"].to_string();
        let (code, out, err) = opsa(&["score", "--model", d, "--messages", &m, "--response", "40", "--chat", "--json"]);
        assert_eq!(code, 0, "{err}");
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(ids(&v["prompt_ids"]), ids(&c["ids"]), "{name}");
    }
    // The llama fixture's generations from a conversation match transformers token for token
    // (parity::*::greedy_generation_matches_transformers); a conversation needs --chat.
    let tmp = tempfile::tempdir().unwrap();
    let file = write(tmp.path(), "c.jsonl", &[json!({"messages": [{"role": "user", "content": "hi"}]})]);
    let (code, _, err) = opsa(&["generate", "--model", fixture("qwen3-tiny").to_str().unwrap(), "--prompts-file", file.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains(&format!("{}:1", file.display())) && err.contains("--chat"), "{err}");
}

/// Each kind of bad line: one error naming the file, the line and the field, from the reader
/// every command uses and from the binary (non-zero exit, no panic).
#[test]
fn bad_conversations_are_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let good = json!({"prompt": "fine", "label": "harmful"});
    let cases = [
        (json!({"messages": [], "label": "harmful"}), "`messages` is empty"),
        (json!({"messages": [{"role": "tool", "content": "x"}], "label": "harmful"}), "`messages[0].role`: unknown role `tool`"),
        (json!({"messages": [{"role": "user", "content": ["a", "b"]}], "label": "harmful"}), "`messages[0].content`: expected a string"),
        (json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": "harmful"}), "`messages[1].role`: the conversation ends with an assistant turn"),
        (json!({"prompt": "q", "messages": [{"role": "user", "content": "q"}], "label": "harmful"}), "`prompt` and `messages`"),
        (json!({"messages": [{"content": "q"}], "label": "harmful"}), "`messages[0].role` is missing"),
        (json!({"messages": [{"role": "system", "content": "s"}], "label": "harmful"}), "no user turn"),
    ];
    for (i, (bad, needle)) in cases.iter().enumerate() {
        let file = write(tmp.path(), &format!("bad{i}.jsonl"), &[good.clone(), bad.clone()]);
        let at = format!("{}:2: ", file.display());
        let errs = [
            read_prompts(&file).unwrap_err().to_string(),
            opsa_train::data::read_prompts(&file).unwrap_err().to_string(),
            opsa_eval::datasets::load("jsonl", &file).unwrap_err().to_string(),
        ];
        for e in &errs {
            assert!(e.contains(&at) && e.contains(needle), "case {i}: {e:?} should name {at:?} and {needle:?}");
        }
        let (code, _, err) = opsa(&["generate", "--model", fixture("qwen3-tiny").to_str().unwrap(), "--prompts-file", file.to_str().unwrap(), "--chat"]);
        assert_ne!(code, 0);
        assert!(!err.contains("panicked") && err.lines().any(|l| l.starts_with("error:") && l.contains(&at) && l.contains(needle)), "case {i}: {err}");
    }
    let (code, _, err) = opsa(&["score", "--model", fixture("qwen3-tiny").to_str().unwrap(), "--messages", "[{\"role\": \"bot\", \"content\": \"q\"}]", "--response", "a", "--chat"]);
    assert_ne!(code, 0);
    assert!(err.contains("--messages: `messages[0].role`: unknown role `bot`"), "{err}");
}
