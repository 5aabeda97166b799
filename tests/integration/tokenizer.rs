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

/// Plain text (no chat template) is encoded as transformers' `tokenizer(text)`: with the
/// post-processor's special tokens (Llama-3-style BOS for llama-tiny, none for Qwen).
#[test]
fn plain_text_gets_the_tokenizers_own_special_tokens() {
    for name in FAMILIES {
        let tok = HfTokenizer::from_dir(&fixture(name)).unwrap();
        for e in reference(name)["encodings"].as_array().unwrap() {
            let text = e["text"].as_str().unwrap();
            assert_eq!(tok.encode_text(text).unwrap(), ids(&e["ids_with_special"]), "{name}: tokenizer({text:?})");
        }
    }
    let r = reference("llama-tiny");
    let e = &r["encodings"][0];
    assert_eq!(ids(&e["ids_with_special"])[1..], ids(&e["ids"])[..], "llama-tiny adds exactly one BOS");
}

/// The R1 template writes BOS itself: the rendered prompt holds it once, not a second time
/// from the post-processor.
#[test]
fn a_template_that_writes_bos_gets_no_second_one() {
    let tok = HfTokenizer::from_dir(&fixture("llama-tiny")).unwrap();
    let bos = tok.inner.token_to_id("<｜begin▁of▁sentence｜>").unwrap();
    for c in reference("llama-tiny")["chats"].as_array().unwrap() {
        let msgs: Vec<ChatMessage> = serde_json::from_value(c["messages"].clone()).unwrap();
        let got = tok.encode_chat(&msgs, &Default::default()).unwrap();
        assert_eq!(got, ids(&c["ids"]));
        assert_eq!(got.iter().filter(|&&t| t == bos).count(), 1, "{got:?}");
        assert_eq!(got[0], bos);
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

#[test]
fn stop_strings_end_generation_and_are_cut_from_text() {
    use burn::backend::NdArray;
    use opsa_generate::{generate, FinishReason, SamplingParams};
    let dir = fixture("qwen2-tiny");
    let (model, _) = opsa_models::load_model::<NdArray>(&dir, &Default::default(), &Default::default()).unwrap();
    let tok = HfTokenizer::from_dir(&dir).unwrap();
    let prompt = ids(&reference("qwen2-tiny")["greedy"][1]["prompt_ids"]);
    let free = generate(&model, &[prompt.clone()], &[0], &SamplingParams { max_new_tokens: 24, ..Default::default() }, &[], Some(&tok))
        .unwrap()
        .remove(0);
    // Stop on a piece of the text the free run produces, past its start.
    let chars: Vec<char> = free.text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let params = SamplingParams { max_new_tokens: 24, stop_strings: vec![stop.clone()], ..Default::default() };
    let g = generate(&model, &[prompt], &[0], &params, &[], Some(&tok)).unwrap().remove(0);
    assert_eq!(g.finish_reason, FinishReason::Stop);
    assert!(g.token_ids.len() < 24 && free.token_ids.starts_with(&g.token_ids));
    assert!(!g.text.contains(&stop), "{:?} / {:?} / {stop:?}", g.text, free.text);
}
