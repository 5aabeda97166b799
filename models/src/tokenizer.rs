//! `tokenizer.json` through the `tokenizers` crate, the chat template rendered with `minijinja`
//! the way `transformers` renders it, and the special tokens / EOS ids of a folder.

use std::path::{Path, PathBuf};

use minijinja::{context, Environment, ErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::ids_of;
use crate::{Error, Result};

/// One chat message as templates see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
    pub fn user(content: &str) -> Self {
        Self::new("user", content)
    }
    pub fn system(content: &str) -> Self {
        Self::new("system", content)
    }
}

/// The tokenizer of a Hugging Face folder, with its chat template and special tokens.
pub struct HfTokenizer {
    pub inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    /// Where the template came from (for error messages).
    template_source: PathBuf,
    /// `bos_token`, `eos_token`, `pad_token`, `unk_token` strings as the template sees them.
    special: Vec<(String, String)>,
    eos_ids: Vec<u32>,
    pad_id: Option<u32>,
    dir: PathBuf,
}

fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map(Some).map_err(|e| Error::Json { path: path.into(), err: e })
}

/// Instructions a chat template may run for one rendering (real templates take thousands).
pub const TEMPLATE_FUEL: u64 = 50_000_000;
/// Longest rendered prompt (far beyond any model's context).
pub const MAX_RENDERED_BYTES: usize = 16 << 20;

/// An output buffer that refuses to grow past [`MAX_RENDERED_BYTES`].
struct LimitedWriter(Vec<u8>);

impl std::io::Write for LimitedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_RENDERED_BYTES {
            self.0.resize(MAX_RENDERED_BYTES, 0);
            return Err(std::io::Error::other("rendered output too large"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl HfTokenizer {
    /// Load `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja` (preferred when
    /// present, as recent `transformers` write it) and `generation_config.json` from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(Error::invalid(&tok_path, "missing (opsa reads the fast-tokenizer file tokenizer.json)"));
        }
        let inner = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| Error::invalid(&tok_path, format!("cannot load tokenizer: {e}")))?;

        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = read_json(&cfg_path)?.unwrap_or(Value::Null);
        let jinja_path = dir.join("chat_template.jinja");
        let (chat_template, template_source) = if jinja_path.is_file() {
            (Some(std::fs::read_to_string(&jinja_path).map_err(|e| Error::io(&jinja_path, e))?), jinja_path)
        } else {
            let t = match cfg.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: use the one called "default".
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                _ => None,
            };
            (t, cfg_path.clone())
        };

        let mut special = Vec::new();
        for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
            if let Some(s) = token_string(cfg.get(key)) {
                special.push((key.to_string(), s));
            }
        }
        let id_of = |s: &str| inner.token_to_id(s);
        let mut eos_ids = Vec::new();
        if let Some(gen) = read_json(&dir.join("generation_config.json"))? {
            eos_ids.extend(ids_of(gen.get("eos_token_id")));
        }
        if let Some(cfg_json) = read_json(&dir.join("config.json"))? {
            if eos_ids.is_empty() {
                eos_ids.extend(ids_of(cfg_json.get("eos_token_id")));
            }
        }
        if let Some((_, eos)) = special.iter().find(|(k, _)| k == "eos_token") {
            match id_of(eos) {
                Some(id) if !eos_ids.contains(&id) => eos_ids.push(id),
                Some(_) => {}
                None => {
                    return Err(Error::invalid(&cfg_path, format!("eos_token `{eos}` is not in tokenizer.json's vocabulary")))
                }
            }
        }
        let pad_id = special.iter().find(|(k, _)| k == "pad_token").and_then(|(_, s)| id_of(s));
        Ok(HfTokenizer { inner, chat_template, template_source, special, eos_ids, pad_id, dir: dir.into() })
    }

    /// Number of token ids the tokenizer can produce (base vocabulary plus added tokens).
    /// The folder the tokenizer was read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Check the tokenizer against the model's embedding rows: the model may have more rows
    /// (real Qwen checkpoints pad to a multiple of 128), never fewer.
    pub fn check_vocab(&self, model_vocab: usize) -> Result<()> {
        let max_id = self.inner.get_vocab(true).values().copied().max().unwrap_or(0) as usize;
        if max_id >= model_vocab {
            return Err(Error::invalid(
                self.dir.join("tokenizer.json"),
                format!(
                    "tokenizer has ids up to {max_id} but config.json vocab_size is {model_vocab}: tokenizer and model do not match"
                ),
            ));
        }
        Ok(())
    }

    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// The chat template's source, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Encode text; `add_special_tokens` as in `transformers` (BOS etc. from the post-processor).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| Error::Tokenizer(format!("cannot encode: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encode a plain-text prompt (no chat template) as transformers' `tokenizer(text)` does:
    /// with the special tokens the tokenizer's post-processor adds (Llama-3 and R1-Distill-Llama:
    /// BOS in front; Qwen: none). A rendered chat prompt goes through [`Self::encode_chat`]
    /// instead, which adds none (the template writes them itself).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        self.encode(text, true)
    }

    /// Decode ids; ids beyond the tokenizer (padding rows of the embedding) decode to nothing.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let n = self.vocab_size() as u32;
        let known: Vec<u32> = ids.iter().copied().filter(|&i| i < n).collect();
        self.inner.decode(&known, skip_special_tokens).map_err(|e| Error::Tokenizer(format!("cannot decode: {e}")))
    }

    /// Render the chat template as `transformers`' `apply_chat_template(tokenize=False)` does:
    /// Jinja with `trim_blocks` and `lstrip_blocks`, Python string methods, `raise_exception`,
    /// the special-token strings, `messages`, `add_generation_prompt` and any extra variables
    /// (`enable_thinking`, ...).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, Value>,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::Tokenizer(format!(
                "{}: this model has no chat template (no chat_template in tokenizer_config.json and no chat_template.jinja); run without --chat",
                self.dir.display()
            ))
        })?;
        let mut env = Environment::new();
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |_fmt: String| -> String { String::new() });
        let src = &self.template_source;
        let err = |e: minijinja::Error| Error::Tokenizer(format!("{}: chat template: {e:#}", src.display()));
        env.add_template("chat", template).map_err(err)?;
        let tmpl = env.get_template("chat").map_err(err)?;
        let mut ctx = serde_json::Map::new();
        for (k, v) in &self.special {
            ctx.insert(k.clone(), Value::String(v.clone()));
        }
        for (k, v) in extra {
            ctx.insert(k.clone(), v.clone());
        }
        ctx.insert("messages".into(), serde_json::to_value(messages).expect("messages serialise"));
        ctx.insert("add_generation_prompt".into(), Value::Bool(add_generation_prompt));
        // Bounded: a template that loops for ever runs out of fuel, one that writes without end
        // stops at MAX_RENDERED_BYTES.
        let mut out = LimitedWriter(Vec::new());
        match tmpl.render_captured_to(context! { ..minijinja::Value::from_serialize(&ctx) }, &mut out) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::OutOfFuel => {
                return Err(Error::Tokenizer(format!(
                    "{}: chat template: rendering did not finish within {TEMPLATE_FUEL} steps (an unbounded loop?)",
                    src.display()
                )))
            }
            Err(_) if out.0.len() >= MAX_RENDERED_BYTES => {
                return Err(Error::Tokenizer(format!(
                    "{}: chat template: the rendered prompt exceeds {} MiB",
                    src.display(),
                    MAX_RENDERED_BYTES >> 20
                )))
            }
            Err(e) => return Err(err(e)),
        }
        String::from_utf8(out.0).map_err(|e| Error::Tokenizer(format!("{}: chat template: output is not UTF-8: {e}", src.display())))
    }

    /// Render a conversation with the generation prompt and encode it without adding special
    /// tokens (the template already holds them, e.g. R1-Distill-Llama's BOS, which the
    /// post-processor would otherwise add a second time), as
    /// `apply_chat_template(add_generation_prompt=True, tokenize=True)` does.
    pub fn encode_chat(&self, messages: &[ChatMessage], extra: &serde_json::Map<String, Value>) -> Result<Vec<u32>> {
        let text = self.apply_chat_template(messages, true, extra)?;
        self.encode(&text, false)
    }
}
