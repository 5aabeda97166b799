//! What a command does with a model folder before the work: open it with its tokenizer (checked
//! against each other) and an optional LoRA adapter, read `--template-var KEY=VALUE` flags,
//! gather and encode the prompts of `generate` and `score`, and `convert` a folder.

use std::path::Path;

use burn::tensor::backend::Backend;
use serde_json::{json, Map, Value};

use crate::checkpoint::{config_dtype, load_model, restore_interrupted, save_model, LoadOptions};
use crate::{CausalLm, Error, HfTokenizer, ModelConfig, Prompt, Result, WeightDType};

/// A model folder with its tokenizer, config and tokenizer checked against each other, and an
/// optional LoRA adapter on top (unmerged; its config is checked before the weights load).
pub fn open_model<B: Backend>(dir: &Path, adapter: Option<&Path>, dtype: WeightDType, device: &B::Device) -> Result<(CausalLm<B>, HfTokenizer)> {
    restore_interrupted(dir)?;
    if !dir.is_dir() {
        return Err(Error::invalid(dir, "model folder does not exist or is not a folder"));
    }
    if let Some(a) = adapter {
        crate::lora::read_adapter_config(a)?;
    }
    let config_path = dir.join("config.json");
    let config = ModelConfig::from_file(&config_path)?;
    let tok = HfTokenizer::from_dir(dir)?;
    tok.check_vocab(config.decoder(&config_path)?.vocab_size)?;
    let (model, _) = load_model::<B>(dir, &LoadOptions { dtype }, device)?;
    let model = match adapter {
        Some(a) => crate::lora::load_adapter(model, a, dir, dtype.burn())?.0,
        None => model,
    };
    Ok((model, tok))
}

/// Chat-template variables from `--template-var KEY=VALUE` flags; VALUE is parsed as JSON when
/// it parses (`enable_thinking=false` is the boolean), else taken as a string.
pub fn parse_template_vars(vars: &[String]) -> Result<Map<String, Value>> {
    let mut m = Map::new();
    for kv in vars {
        let (k, v) = kv.split_once('=').ok_or_else(|| Error::Input(format!("--template-var `{kv}`: expected KEY=VALUE")))?;
        let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
        m.insert(k.to_string(), value);
    }
    Ok(m)
}

/// The prompts of `generate`: the lines of a prompts file, else the `--prompt` texts; each with
/// where it comes from (`FILE:LINE`, `--prompt N`), for errors.
pub fn gather_prompts(file: Option<&Path>, texts: &[String]) -> Result<Vec<(String, Prompt)>> {
    Ok(match file {
        Some(p) => crate::prompt::read_prompts(p)?.into_iter().map(|l| (format!("{}:{}", p.display(), l.line), l.prompt)).collect(),
        None if texts.is_empty() => return Err(Error::Input("give --prompt TEXT or --prompts-file FILE".into())),
        None => texts.iter().enumerate().map(|(i, p)| (format!("--prompt {}", i + 1), Prompt::from(p.as_str()))).collect(),
    })
}

/// The prompt of `score`: the `--prompt` text, or the `--messages` conversation (a JSON list).
pub fn prompt_or_messages(prompt: Option<&str>, messages: Option<&str>) -> Result<Prompt> {
    match (prompt, messages) {
        (Some(p), _) => Ok(Prompt::from(p)),
        (None, Some(m)) => {
            let list: Value = serde_json::from_str(m).map_err(|e| Error::Input(format!("--messages: not JSON: {e}")))?;
            Prompt::from_object(&json!({ "messages": list }), "prompt").map_err(|e| Error::Input(format!("--messages: {e}")))
        }
        (None, None) => Err(Error::Input("give --prompt TEXT or --messages JSON".into())),
    }
}

/// A model opened for prompting as `generate` and `score` do: with `chat`, each prompt is
/// rendered with the chat template (after the `system` message, with `vars`); without, it is
/// plain text.
pub struct PromptedModel<B: Backend> {
    pub model: CausalLm<B>,
    pub tok: HfTokenizer,
    pub chat: bool,
    pub system: Option<String>,
    pub vars: Map<String, Value>,
}

impl<B: Backend> PromptedModel<B> {
    /// [`open_model`], failing before any work (with the folder named) when `chat` is asked of
    /// a tokenizer without a chat template.
    pub fn open(
        dir: &Path,
        adapter: Option<&Path>,
        dtype: WeightDType,
        chat: bool,
        system: Option<&str>,
        template_vars: &[String],
        device: &B::Device,
    ) -> Result<Self> {
        let vars = parse_template_vars(template_vars)?;
        let (model, tok) = open_model::<B>(dir, adapter, dtype, device)?;
        if chat && !tok.has_chat_template() {
            tok.apply_chat_template(&[], true, &vars)?;
        }
        Ok(PromptedModel { model, tok, chat, system: system.map(str::to_string), vars })
    }

    /// With `chat`: the conversation (after the system message) rendered with the generation
    /// prompt, no special tokens added. Without: the plain text as `tokenizer(text)` encodes it.
    pub fn encode_prompt(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let ids = match prompt {
            Prompt::Text(t) if t.is_empty() => return Err(Error::Input("the prompt is empty".into())),
            _ if self.chat => {
                let msgs = match &self.system {
                    Some(s) => prompt.with_system(s).map_err(Error::Input)?,
                    None => prompt.messages(),
                };
                self.tok.encode_chat(&msgs, &self.vars)?
            }
            Prompt::Text(t) => self.tok.encode_text(t)?,
            Prompt::Messages(_) => return Err(Error::Input("`messages`: a conversation is rendered with the chat template; add --chat".into())),
        };
        if ids.is_empty() {
            return Err(Error::Input("the prompt tokenised to no tokens".into()));
        }
        Ok(ids)
    }
}

/// `convert`: load `model` (with `adapter` merged in, W + s·A·B in f32) and write it to `out` in
/// `dtype` (default: the dtype its `config.json` declares, else f32). Returns the dtype written.
pub fn convert<B: Backend>(model: &Path, adapter: Option<&Path>, out: &Path, dtype: Option<WeightDType>, overwrite: bool, device: &B::Device) -> Result<WeightDType> {
    if let Some(ad) = adapter {
        crate::lora::read_adapter_config(ad)?;
    }
    let (m, config) = load_model::<B>(model, &LoadOptions::default(), device)?;
    let m = match adapter {
        Some(ad) => crate::lora::load_adapter(m, ad, model, burn::tensor::DType::F32)?.0,
        None => m,
    };
    let dtype = dtype.or_else(|| config_dtype(&config)).unwrap_or(WeightDType::F32);
    save_model(&m, &config, Some(model), out, dtype, overwrite)?;
    Ok(dtype)
}
