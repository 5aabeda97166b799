//! Sample from a Hugging Face model folder with its chat template, and print the text and the
//! log-probability of every generated token.
//!
//!     cargo run --example sample_chat                       # the shipped toy model
//!     cargo run --example sample_chat -- DIR "What is 17*23?"
//!
//! DIR is any Qwen2 / Qwen3 / Llama folder (config.json, safetensors, tokenizer.json,
//! tokenizer_config.json); nothing is downloaded.

use std::path::PathBuf;

use burn::backend::NdArray;
use opsa_generate::{generate, SamplingParams};
use opsa_models::{load_model, ChatMessage, HfTokenizer, LoadOptions};

type B = NdArray; // the CPU reference backend (f32)

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args.get(1).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/toy-qwen3"));
    let question = args.get(2).map(String::as_str).unwrap_or("What is 23 + 45?");
    let device = Default::default();

    // 1. The model: config.json is parsed and checked, the safetensors are memory-mapped and
    //    every tensor's name and shape is checked against the config.
    let (model, _config) = load_model::<B>(&dir, &LoadOptions::default(), &device)?;
    let tok = HfTokenizer::from_dir(&dir)?;
    tok.check_vocab(model.config.vocab_size)?; // tokenizer ids must fit the embedding rows
    println!("model: {} ({} layers, vocab {})", dir.display(), model.config.num_hidden_layers, model.config.vocab_size);

    // 2. The prompt: one user turn through the folder's chat template, with the generation
    //    prompt (`<|im_start|>assistant\n` for Qwen), exactly as transformers'
    //    `apply_chat_template(add_generation_prompt=True)` renders it. Template variables such
    //    as `enable_thinking` would go in `vars`.
    let vars = serde_json::Map::new();
    let text = tok.apply_chat_template(&[ChatMessage::user(question)], true, &vars)?;
    let prompt_ids = tok.encode(&text, false)?; // [t]; the template already wrote the special tokens
    println!("--- rendered prompt ({} tokens) ---\n{text}", prompt_ids.len());

    // 3. Sample. A batch is a list of prompts; `row_index` seeds each prompt's own random
    //    stream, so a prompt samples the same whatever batch it is in.
    let params = SamplingParams { temperature: 0.7, top_p: 0.95, top_k: 20, max_new_tokens: 64, seed: 0, stop_strings: vec![] };
    let out = generate(&model, &[prompt_ids], &[0], &params, tok.eos_ids(), Some(&tok))?;
    let g = &out[0];

    // 4. The response, then every token with its log-probability under the raw model
    //    (untempered, unfiltered: what the trainer and `opsa score` use).
    println!("--- response ({} tokens, finish: {}) ---\n{}", g.token_ids.len(), g.finish_reason.as_str(), g.text);
    println!("--- per-token log-probs ---");
    for (i, (&id, &lp)) in g.token_ids.iter().zip(&g.logprobs).enumerate() {
        let piece = tok.decode(&[id], false)?;
        println!("{i:>3}  {id:>5}  {lp:>8.4}  {piece:?}");
    }
    let mean = g.logprobs.iter().sum::<f32>() / g.logprobs.len().max(1) as f32;
    println!("mean log-prob {mean:.4}");
    Ok(())
}
