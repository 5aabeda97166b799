//! `opsa-models`: the Qwen2 (DeepSeek-R1-Distill-Qwen), Qwen3 and Llama (DeepSeek-R1-Distill-Llama,
//! Llama-3.x) decoder families in Burn, and Hugging Face folder I/O (config, safetensors in and
//! out, tokenizer, chat template).
//!
//! - [`qwen2`], [`qwen3`] and [`llama`] hold each family's `config.json` schema, with Hugging Face
//!   field names verbatim, and what each family switches on in the shared decoder; [`rope`] reads
//!   `rope_theta` / `rope_scaling` and computes the inverse frequencies for all of them.
//! - [`decoder`] is the one decoder all families use: RMSNorm, rotate-half RoPE, grouped-query
//!   attention with an optional KV cache, SwiGLU MLP. Field names equal Hugging Face state-dict
//!   names (`model.layers.0.self_attn.q_proj.weight`, ...).
//! - [`checkpoint`] reads and writes safetensors (single file or sharded) and whole HF folders.
//! - [`tokenizer`] wraps `tokenizer.json`, the chat template and the EOS ids.
//! - [`prompt`] reads prompts files: plain `prompt` text or `messages` conversations.
//! - [`open`] opens a folder for a command (model, tokenizer, adapter, template variables) and
//!   encodes its prompts; `convert`.
//!
//! All model code is generic over `B: Backend`.

pub mod checkpoint;
pub mod decoder;
pub mod llama;
pub mod lora;
pub mod open;
pub mod prompt;
pub mod qwen2;
pub mod qwen3;
pub mod rope;
pub mod tokenizer;
pub mod trunk;

mod config;
mod error;

pub use checkpoint::{load_model, save_model, LoadOptions};
pub use config::{ModelConfig, WeightDType};
pub use decoder::{CausalLm, DecoderConfig, KvCache};
pub use lora::LoraConfig;
pub use open::{open_model, parse_template_vars, PromptedModel};
pub use error::{Error, Result};
pub use prompt::Prompt;
pub use tokenizer::{ChatMessage, HfTokenizer};
pub use trunk::Trunk;
