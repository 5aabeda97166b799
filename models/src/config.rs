//! `config.json` dispatch on `model_type`, and the checks shared by the families.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::decoder::DecoderConfig;
use crate::llama::LlamaConfig;
use crate::qwen2::Qwen2Config;
use crate::qwen3::Qwen3Config;
use crate::{Error, Result};

/// A parsed Hugging Face `config.json`, by family. The original JSON is kept so that a saved
/// checkpoint writes back every field the user's file had, not only the ones we read.
#[derive(Debug, Clone)]
pub enum ModelConfig {
    Qwen2(Qwen2Config, Value),
    Qwen3(Qwen3Config, Value),
    Llama(LlamaConfig, Value),
}

/// The dtype weights are held in during a run (`--dtype`). In configs: `f32` (or `float32`)
/// and `bf16` (or `bfloat16`), written back as `f32` and `bf16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDType {
    #[default]
    #[serde(alias = "float32")]
    F32,
    #[serde(alias = "bfloat16")]
    BF16,
}

/// Compares with a name as [`WeightDType::parse`] reads it (`dtype == "bf16"`).
impl PartialEq<&str> for WeightDType {
    fn eq(&self, name: &&str) -> bool {
        WeightDType::parse(name) == Ok(*self)
    }
}

impl std::fmt::Display for WeightDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::BF16 => "bf16",
        })
    }
}

impl WeightDType {
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::BF16),
            other => Err(format!("unsupported dtype `{other}` (expected f32 or bf16)")),
        }
    }
    pub fn burn(self) -> burn::tensor::DType {
        match self {
            Self::F32 => burn::tensor::DType::F32,
            Self::BF16 => burn::tensor::DType::BF16,
        }
    }
    /// The name Hugging Face writes in `config.json` (`dtype` / `torch_dtype`).
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::BF16 => "bfloat16",
        }
    }
}

impl ModelConfig {
    /// Read and validate `config.json`. Unknown `model_type`s and options we do not implement are
    /// rejected here, at load, with the file named.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let raw: Value =
            serde_json::from_str(text).map_err(|e| Error::Json { path: path.into(), err: e })?;
        let model_type = raw
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::invalid(path, "missing string field `model_type`"))?;
        let cfg = match model_type {
            "qwen2" => ModelConfig::Qwen2(parse(&raw, path)?, raw.clone()),
            "qwen3" => ModelConfig::Qwen3(parse(&raw, path)?, raw.clone()),
            "llama" => ModelConfig::Llama(parse(&raw, path)?, raw.clone()),
            other => {
                return Err(Error::invalid(
                    path,
                    format!("unsupported model_type `{other}` (opsa implements `qwen2`, `qwen3` and `llama`)"),
                ))
            }
        };
        cfg.decoder(path)?; // run every check now
        Ok(cfg)
    }

    /// The decoder this checkpoint describes, after validation.
    pub fn decoder(&self, path: &Path) -> Result<DecoderConfig> {
        let d = match self {
            ModelConfig::Qwen2(c, raw) => c.decoder(raw, path)?,
            ModelConfig::Qwen3(c, raw) => c.decoder(raw, path)?,
            ModelConfig::Llama(c, raw) => c.decoder(raw, path)?,
        };
        d.validate(path)?;
        check_sizes(&d, path)?;
        Ok(d)
    }

    pub fn raw(&self) -> &Value {
        match self {
            ModelConfig::Qwen2(_, raw) | ModelConfig::Qwen3(_, raw) | ModelConfig::Llama(_, raw) => raw,
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(raw: &Value, path: &Path) -> Result<T> {
    serde_json::from_value(raw.clone()).map_err(|e| Error::invalid(path, e.to_string()))
}

/// A token id field that may be an integer, a list of integers, or null.
pub(crate) fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
        _ => vec![],
    }
}

/// The `config.json` fields every family shares (names verbatim from Hugging Face); each family's
/// struct flattens it in and adds its own.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommonConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "silu")]
    pub hidden_act: String,
}

fn silu() -> String {
    "silu".into()
}

impl CommonConfig {
    /// The checks every family runs (activation, sliding window, rope) and the decoder they
    /// describe with every family switch off; `head_dim` defaults to `hidden_size / heads`,
    /// `default_theta` is the family's `rope_theta` when the file names none.
    pub(crate) fn decoder(&self, raw: &Value, path: &Path, head_dim: Option<usize>, default_theta: f64) -> Result<DecoderConfig> {
        check_act(&self.hidden_act, path)?;
        check_no_sliding_window(raw, self.num_hidden_layers, self.max_position_embeddings, path)?;
        let (rope_theta, rope_scaling) = crate::rope::from_raw(raw, default_theta, path)?;
        Ok(DecoderConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1)),
            max_position_embeddings: self.max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
        })
    }
}

/// Sliding-window attention that would actually change any layer's attention is rejected.
fn check_no_sliding_window(raw: &Value, num_layers: usize, max_pos: usize, path: &Path) -> Result<()> {
    if let Some(Value::Array(types)) = raw.get("layer_types") {
        if let Some(i) = types.iter().position(|t| t.as_str() != Some("full_attention")) {
            return Err(Error::invalid(
                path,
                format!("layer_types[{i}] = {}: only full attention is supported", types[i]),
            ));
        }
        return Ok(());
    }
    let used = raw.get("use_sliding_window").and_then(Value::as_bool).unwrap_or(false);
    let window = raw.get("sliding_window").and_then(Value::as_u64).map(|w| w as usize);
    let first = raw.get("max_window_layers").and_then(Value::as_u64).unwrap_or(num_layers as u64) as usize;
    if used && first < num_layers && window.is_some_and(|w| w < max_pos) {
        return Err(Error::invalid(
            path,
            "use_sliding_window = true with a window shorter than max_position_embeddings: sliding-window attention is not supported",
        ));
    }
    Ok(())
}

fn check_act(act: &str, path: &Path) -> Result<()> {
    if act != "silu" {
        return Err(Error::invalid(path, format!("hidden_act `{act}` is not supported (expected silu)")));
    }
    Ok(())
}

/// Every weight's element count must be a number a machine can hold: sizes such as
/// `num_attention_heads = 2^62` are refused here, by name, instead of wrapping around.
fn check_sizes(d: &DecoderConfig, path: &Path) -> Result<()> {
    let (h, hd, i, v) = (d.hidden_size, d.head_dim, d.intermediate_size, d.vocab_size);
    let products = [
        ("num_attention_heads × head_dim × hidden_size", [d.num_attention_heads, hd, h]),
        ("num_key_value_heads × head_dim × hidden_size", [d.num_key_value_heads, hd, h]),
        ("intermediate_size × hidden_size", [i, h, 1]),
        ("vocab_size × hidden_size", [v, h, 1]),
        ("num_hidden_layers × hidden_size", [d.num_hidden_layers, h, 1]),
    ];
    for (what, [a, b, c]) in products {
        let n = a.checked_mul(b).and_then(|x| x.checked_mul(c)).filter(|&n| n <= 1 << 40);
        if n.is_none() {
            return Err(Error::Invalid { path: path.to_path_buf(), msg: format!("{what} = {a} × {b} × {c} is too large for any model (over 2^40 weights)") });
        }
    }
    Ok(())
}
