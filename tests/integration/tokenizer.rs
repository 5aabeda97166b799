//! Tokenizer encodings and chat-template renderings against transformers.

use opsa_models::{ChatMessage, HfTokenizer};
use serde_json::Value;

use crate::common::*;

#[test]
fn encodings_match_transformers() {
    for name in FAMILIES {
        let tok = HfTokenizer::from_dir(&fixture(name)).unwrap();
        for e in reference(name)["encodings"].as_array().unwrap() {
            let text = e["text"].as_str().unwrap();
            assert_eq!(tok.encode(text, false).unwrap(), ids(&e["ids"]), "{name}: encoding of {text:?}");
        }
    }
}

#[test]
fn chat_templates_match_transformers() {
    for name in FAMILIES {
        let tok = HfTokenizer::from_dir(&fixture(name)).unwrap();
        for c in reference(name)["chats"].as_array().unwrap() {
            let msgs: Vec<ChatMessage> = serde_json::from_value(c["messages"].clone()).unwrap();
            let extra = c["extra"].as_object().unwrap();
            let text = tok.apply_chat_template(&msgs, true, extra).unwrap();
            assert_eq!(text, c["text"].as_str().unwrap(), "{name}: rendering of {msgs:?} {extra:?}");
            assert_eq!(tok.encode_chat(&msgs, extra).unwrap(), ids(&c["ids"]));
        }
    }
}

#[test]
fn eos_ids_come_from_generation_config_and_tokenizer() {
    let r = reference("qwen3-tiny");
    let tok = HfTokenizer::from_dir(&fixture("qwen3-tiny")).unwrap();
    let mut got = tok.eos_ids().to_vec();
    got.sort();
    let mut want = ids(&r["eos_ids"]);
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn thinking_switch_reaches_the_template() {
    let tok = HfTokenizer::from_dir(&fixture("qwen3-tiny")).unwrap();
    let msgs = [ChatMessage::user("hi")];
    let mut extra = serde_json::Map::new();
    let on = tok.apply_chat_template(&msgs, true, &extra).unwrap();
    extra.insert("enable_thinking".into(), Value::Bool(false));
    let off = tok.apply_chat_template(&msgs, true, &extra).unwrap();
    assert!(!on.contains("<think>") && off.ends_with("<think>\n\n</think>\n\n"), "{on:?} / {off:?}");
}

#[test]
fn missing_chat_template_is_a_clear_error() {
    let dir = copy_fixture("qwen3-tiny");
    std::fs::remove_file(dir.path().join("chat_template.jinja")).unwrap();
    let tok = HfTokenizer::from_dir(dir.path()).unwrap();
    let err = tok.apply_chat_template(&[ChatMessage::user("hi")], true, &Default::default()).unwrap_err().to_string();
    assert!(err.contains("no chat template"), "{err}");
}
