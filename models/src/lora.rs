//! LoRA adapters in PEFT's conventions and file format.
//!
//! An adapter lives inside the [`Linear`] it adapts ([`Linear::lora`]): `y = x W + b + s · (x A) B`
//! with `A` `[in, r]`, `B` `[r, out]` (Burn layout; PEFT stores `lora_A.weight` `[r, in]` and
//! `lora_B.weight` `[out, r]`) and `s = alpha / r`. A fresh adapter has `A` Kaiming-uniform with
//! `a = √5` (uniform in `±1/√in`, as `nn.init.kaiming_uniform_` gives PEFT) and `B = 0`, so it
//! starts as the base model exactly.
//!
//! The base weights of a LoRA model are frozen ([`CausalLm::freeze`]: Burn's
//! `set_require_grad(false)`), so autodiff computes no gradient for them and the optimiser keeps no
//! state for them; only the adapters train. [`CausalLm::without_adapters`] is the base model
//! sharing the same weight tensors (no copy): what the OPSA and COPSD teachers are.
//!
//! On disk an adapter is a PEFT folder: `adapter_config.json` and `adapter_model.safetensors`
//! with keys `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`
//! ([`save_adapter`], [`load_adapter`]). PEFT options we do not implement (DoRA, rsLoRA, biases,
//! `modules_to_save`, per-layer patterns, regular-expression targets) are refused with the field
//! named.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, FloatDType, Tensor, TensorData};
use safetensors::tensor::{Dtype as StDtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::checkpoint::{decode_f32, param, transpose, write_atomically, SplitMix};
use crate::decoder::{CausalLm, Linear};
use crate::{Error, Result};

/// The modules an adapter may target (PEFT's names for the Qwen2/Qwen3/Llama projections).
pub const TARGETS: &[&str] = &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// PEFT's prefix of every adapter tensor name.
const PEFT_PREFIX: &str = "base_model.model.";

/// `[lora]` of a training config, and what `adapter_config.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank.
    pub r: usize,
    /// Scale numerator: the update is `alpha / r · x A B`.
    pub alpha: f64,
    /// Dropout on the adapter's input while training (PEFT's `lora_dropout`).
    #[serde(default)]
    pub dropout: f64,
    /// Module names, from [`TARGETS`].
    pub target_modules: Vec<String>,
}

impl LoraConfig {
    /// Check every field; `name` maps our field name (`r`, `alpha`, `dropout`, `target_modules`)
    /// to the one the user wrote (`lora.r`, or PEFT's `lora_alpha`, ...).
    pub fn check(&self, name: impl Fn(&str) -> String) -> std::result::Result<(), String> {
        if self.r == 0 {
            return Err(format!("{} must be positive, got 0", name("r")));
        }
        if !(self.alpha > 0.0) || !self.alpha.is_finite() {
            return Err(format!("{} must be > 0, got {}", name("alpha"), self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("{} must lie in [0, 1), got {}", name("dropout"), self.dropout));
        }
        if self.target_modules.is_empty() {
            return Err(format!("{} is empty; name some of {}", name("target_modules"), TARGETS.join(", ")));
        }
        for m in &self.target_modules {
            if !TARGETS.contains(&m.as_str()) {
                return Err(format!("{}: unknown module `{m}`; expected some of {}", name("target_modules"), TARGETS.join(", ")));
            }
        }
        Ok(())
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// Number of adapter parameters on a decoder of this shape.
    pub fn num_parameters(&self, c: &crate::DecoderConfig) -> usize {
        self.target_modules.iter().map(|m| {
            let (i, o) = module_shape(c, m);
            self.r * (i + o)
        }).sum::<usize>() * c.num_hidden_layers
    }
}

/// `[in, out]` of a target module.
pub fn module_shape(c: &crate::DecoderConfig, module: &str) -> (usize, usize) {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let (nq, nkv) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
    match module {
        "q_proj" => (h, nq),
        "k_proj" | "v_proj" => (h, nkv),
        "o_proj" => (nq, h),
        "gate_proj" | "up_proj" => (h, i),
        "down_proj" => (i, h),
        other => unreachable!("checked target module {other}"),
    }
}

/// One adapter: `s · (dropout(x) A) B`.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// `[in, r]` (PEFT's `lora_A.weight` transposed).
    pub lora_a: Param<Tensor<B, 2>>,
    /// `[r, out]` (PEFT's `lora_B.weight` transposed).
    pub lora_b: Param<Tensor<B, 2>>,
    #[module(skip)]
    pub scale: f64,
    #[module(skip)]
    pub dropout: f64,
}

impl<B: Backend> Lora<B> {
    /// The update for a flattened input, in the input's dtype. Dropout acts only where the
    /// adapter is being trained (its tensors require gradients), as PEFT's does in train mode.
    ///
    /// # Shapes
    /// - x: `[n, in]` → `[n, out]`
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let dtype = x.dtype();
        let a = self.lora_a.val();
        let x = if self.dropout > 0.0 && a.is_require_grad() {
            let keep = 1.0 - self.dropout;
            let mask = Tensor::<B, 2>::random(x.dims(), Distribution::Bernoulli(keep), &x.device()).cast(dtype);
            x * mask.div_scalar(keep)
        } else {
            x
        };
        let a = if a.dtype() == dtype { a } else { a.cast(dtype) };
        let b = self.lora_b.val();
        let b = if b.dtype() == dtype { b } else { b.cast(dtype) };
        x.matmul(a).matmul(b).mul_scalar(self.scale)
    }

    /// `s · A B` `[in, out]` in f32.
    pub fn delta(&self) -> Tensor<B, 2> {
        self.lora_a.val().cast(FloatDType::F32).matmul(self.lora_b.val().cast(FloatDType::F32)).mul_scalar(self.scale)
    }
}

/// Stops gradients for every parameter it maps.
struct Freeze;

impl<B: Backend> ModuleMapper<B> for Freeze {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        param.set_require_grad(false)
    }
}

/// The PEFT tensor names of a module's adapter.
fn peft_names(module: &str) -> (String, String) {
    (format!("{PEFT_PREFIX}{module}.lora_A.weight"), format!("{PEFT_PREFIX}{module}.lora_B.weight"))
}

/// The short module name of an HF prefix: `model.layers.3.mlp.up_proj` → `up_proj`.
fn short(prefix: &str) -> &str {
    prefix.rsplit('.').next().unwrap_or(prefix)
}

impl<B: Backend> CausalLm<B> {
    /// The adapted linears of the decoder layers with their Hugging Face prefixes, in layer order
    /// (the head is never a target).
    pub fn layer_linears_mut(&mut self) -> Vec<(String, &mut Linear<B>)> {
        let mut out = Vec::new();
        for (i, l) in self.model.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &mut l.self_attn;
            for (n, lin) in [("q_proj", &mut a.q_proj), ("k_proj", &mut a.k_proj), ("v_proj", &mut a.v_proj), ("o_proj", &mut a.o_proj)] {
                out.push((format!("{p}.self_attn.{n}"), lin));
            }
            let m = &mut l.mlp;
            for (n, lin) in [("gate_proj", &mut m.gate_proj), ("up_proj", &mut m.up_proj), ("down_proj", &mut m.down_proj)] {
                out.push((format!("{p}.mlp.{n}"), lin));
            }
        }
        out
    }

    /// Whether any linear carries an adapter.
    pub fn has_adapters(&self) -> bool {
        self.model.layers.iter().any(|l| {
            let (a, m) = (&l.self_attn, &l.mlp);
            [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj].iter().any(|x| x.lora.is_some())
        })
    }

    /// Every parameter stops requiring gradients (the base of a LoRA model).
    pub fn freeze(self) -> Self {
        self.map(&mut Freeze)
    }

    /// Fresh adapters on the target modules (PEFT's initialisation, seeded): A Kaiming-uniform
    /// (`a = √5`, i.e. uniform in `±1/√in`), B zeros, held in `dtype`. Existing parameters are
    /// left as they are (call [`Self::freeze`] first to train only the adapters).
    pub fn with_new_adapters(mut self, cfg: &LoraConfig, seed: u64, dtype: DType) -> Self {
        let device = self.device();
        let mut rng = SplitMix::new(seed ^ 0x4C6F_5241);
        let (r, scale, dropout) = (cfg.r, cfg.scale(), cfg.dropout);
        for (prefix, lin) in self.layer_linears_mut() {
            if !cfg.target_modules.iter().any(|m| m == short(&prefix)) {
                continue;
            }
            let [d_in, d_out] = lin.weight.dims();
            let bound = 1.0 / (d_in as f64).sqrt();
            let a: Vec<f32> = (0..d_in * r).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32).collect();
            let (na, nb) = peft_names(&prefix);
            let lora_a = param(&na, Tensor::from_data(TensorData::new(a, [d_in, r]), (&device, dtype)));
            let lora_b = param(&nb, Tensor::zeros([r, d_out], (&device, dtype)));
            lin.lora = Some(Lora { lora_a, lora_b, scale, dropout });
        }
        self
    }

    /// The same model without its adapters: the base weights, shared (no copy).
    pub fn without_adapters(&self) -> Self {
        let mut m = self.clone();
        for (_, lin) in m.layer_linears_mut() {
            lin.lora = None;
        }
        m
    }

    /// The adapters folded into the base weights (`W + s · A B`, computed in f32, stored in the
    /// weight dtype); no adapters left.
    pub fn merge_adapters(mut self) -> Self {
        for (_, lin) in self.layer_linears_mut() {
            if let Some(l) = lin.lora.take() {
                let w = lin.weight.val();
                let dtype = w.dtype();
                let merged = (w.cast(FloatDType::F32) + l.delta()).cast(dtype);
                let require = merged.is_require_grad();
                lin.weight = Param::initialized(lin.weight.id, merged.set_require_grad(require));
            }
        }
        self
    }
}

/// Write the model's adapters as a PEFT folder (`adapter_config.json`,
/// `adapter_model.safetensors`, f32), atomically; an existing `out` is replaced only with
/// `overwrite`.
pub fn save_adapter<B: Backend>(model: &CausalLm<B>, cfg: &LoraConfig, base_model: &str, out: &Path, overwrite: bool) -> Result<()> {
    let mut model = model.clone();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let f32_bytes = |v: Vec<f32>| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    for (prefix, lin) in model.layer_linears_mut() {
        let Some(l) = &lin.lora else { continue };
        let (na, nb) = peft_names(&prefix);
        let [d_in, r] = l.lora_a.dims();
        let [_, d_out] = l.lora_b.dims();
        let host = |t: Tensor<B, 2>| t.into_data().convert::<f32>().to_vec::<f32>().expect("f32 data");
        tensors.push((na, vec![r, d_in], f32_bytes(transpose(&host(l.lora_a.val()), d_in, r))));
        tensors.push((nb, vec![d_out, r], f32_bytes(transpose(&host(l.lora_b.val()), r, d_out))));
    }
    if tensors.is_empty() {
        return Err(Error::Input("the model has no adapters to save".into()));
    }
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": if cfg.alpha.fract() == 0.0 && cfg.alpha < 1e15 { json!(cfg.alpha as i64) } else { json!(cfg.alpha) },
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.target_modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_dora": false,
        "use_rslora": false,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    write_atomically(out, overwrite, |dir| {
        let p = dir.join("adapter_config.json");
        std::fs::write(&p, serde_json::to_string_pretty(&config).expect("JSON") + "\n").map_err(|e| Error::io(&p, e))?;
        let views = tensors
            .iter()
            .map(|(n, s, b)| TensorView::new(StDtype::F32, s.clone(), b).map(|v| (n.clone(), v)).map_err(|e| Error::tensor(n, format!("cannot serialise: {e}"))))
            .collect::<Result<Vec<_>>>()?;
        let p = dir.join("adapter_model.safetensors");
        let meta = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
        safetensors::serialize_to_file(views, meta, &p).map_err(|e| Error::invalid(&p, format!("cannot write safetensors: {e}")))
    })
}

/// Read and check `DIR/adapter_config.json`: a LoRA adapter with only the options we implement.
pub fn read_adapter_config(dir: &Path) -> Result<(LoraConfig, Option<String>)> {
    if !dir.is_dir() {
        return Err(Error::invalid(dir, "adapter folder does not exist or is not a folder"));
    }
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::Json { path: path.clone(), err: e })?;
    let bad = |m: String| Err(Error::invalid(&path, m));
    let get = |k: &str| v.get(k).filter(|x| !x.is_null());
    match get("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        other => return bad(format!("peft_type is {other:?}; only LORA adapters are supported")),
    }
    if let Some(t) = get("task_type").and_then(Value::as_str) {
        if t != "CAUSAL_LM" {
            return bad(format!("task_type `{t}`: only CAUSAL_LM adapters fit a causal language model"));
        }
    }
    for (k, what) in [
        ("use_dora", "DoRA"),
        ("use_rslora", "rsLoRA"),
        ("use_qalora", "QALoRA"),
        ("lora_bias", "a bias on lora_B"),
        ("fan_in_fan_out", "fan_in_fan_out (Conv1D layers)"),
    ] {
        if get(k).and_then(Value::as_bool) == Some(true) {
            return bad(format!("{k} = true: {what} is not implemented"));
        }
    }
    if let Some(b) = get("bias").and_then(Value::as_str) {
        if b != "none" {
            return bad(format!("bias = \"{b}\": only bias = \"none\" is implemented"));
        }
    }
    for k in [
        "modules_to_save",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "trainable_token_indices",
        "exclude_modules",
        "layer_replication",
        "target_parameters",
        "alora_invocation_tokens",
    ] {
        let set = match get(k) {
            None => false,
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::Object(o)) => !o.is_empty(),
            Some(Value::String(s)) => !s.is_empty(),
            Some(_) => true,
        };
        if set {
            return bad(format!("{k} is set: not implemented (only plain LoRA on whole layers)"));
        }
    }
    let r = get("r").and_then(Value::as_u64).ok_or_else(|| Error::invalid(&path, "r: missing or not a non-negative integer"))? as usize;
    let alpha = get("lora_alpha").and_then(Value::as_f64).ok_or_else(|| Error::invalid(&path, "lora_alpha: missing or not a number"))?;
    let dropout = get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
    let target_modules = match get("target_modules") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string).ok_or_else(|| Error::invalid(&path, "target_modules: expected a list of module names")))
            .collect::<Result<Vec<_>>>()?,
        Some(Value::String(s)) => return bad(format!("target_modules = \"{s}\": a regular expression is not supported; give a list of module names")),
        _ => return bad("target_modules: missing (expected a list of module names)".into()),
    };
    let cfg = LoraConfig { r, alpha, dropout, target_modules };
    let peft_name = |k: &str| match k {
        "alpha" => "lora_alpha".to_string(),
        "dropout" => "lora_dropout".to_string(),
        k => k.to_string(),
    };
    cfg.check(peft_name).map_err(|m| Error::invalid(&path, m))?;
    let base = get("base_model_name_or_path").and_then(Value::as_str).map(str::to_string);
    Ok((cfg, base))
}

/// Whether an adapter's `base_model_name_or_path` names the base folder `base_dir`: absent, the
/// same folder, or the same last path component (a hub id `Qwen/Qwen3-8B` fits a local
/// `.../Qwen3-8B`, case-insensitively).
fn base_fits(name: &str, base_dir: &Path) -> bool {
    if name.is_empty() {
        return true;
    }
    let p = Path::new(name);
    if let (Ok(a), Ok(b)) = (p.canonicalize(), base_dir.canonicalize()) {
        if a == b {
            return true;
        }
    }
    let last = |p: &Path| p.components().next_back().map(|c| c.as_os_str().to_string_lossy().to_lowercase());
    let base_last = base_dir.canonicalize().ok().and_then(|b| last(&b)).or_else(|| last(base_dir));
    last(p).is_some() && last(p) == base_last
}

/// Attach the PEFT adapter in `dir` to `model` (loaded from `base_dir`), its tensors held in
/// `dtype`. Everything is checked before anything is attached: the config's options, the base
/// model's name, every tensor's presence and shape, and that no tensor is left over.
pub fn load_adapter<B: Backend>(model: CausalLm<B>, dir: &Path, base_dir: &Path, dtype: DType) -> Result<(CausalLm<B>, LoraConfig)> {
    let (cfg, base) = read_adapter_config(dir)?;
    if let Some(name) = &base {
        if !base_fits(name, base_dir) {
            return Err(Error::invalid(
                dir.join("adapter_config.json"),
                format!("base_model_name_or_path `{name}` does not fit the base model {}", base_dir.display()),
            ));
        }
    }
    let file: PathBuf = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&file).map_err(|e| Error::io(&file, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::invalid(&file, format!("not a valid safetensors file: {e}")))?;
    let mut used = HashSet::new();
    let mut read = |name: &str, shape: [usize; 2]| -> Result<Vec<f32>> {
        let view = st.tensor(name).map_err(|_| Error::tensor(name, format!("missing from {} (expected shape {shape:?})", file.display())))?;
        if view.shape() != shape {
            return Err(Error::tensor(name, format!("has shape {:?} in {}, which does not fit the base model (expected {shape:?})", view.shape(), file.display())));
        }
        used.insert(name.to_string());
        decode_f32(name, &view, &file)
    };
    let mut model = model;
    let device = model.device();
    let (r, scale) = (cfg.r, cfg.scale());
    let mut adapters = Vec::new();
    for (prefix, lin) in model.layer_linears_mut() {
        if !cfg.target_modules.iter().any(|m| m == short(&prefix)) {
            continue;
        }
        let [d_in, d_out] = lin.weight.dims();
        let (na, nb) = peft_names(&prefix);
        let a = transpose(&read(&na, [r, d_in])?, r, d_in);
        let b = transpose(&read(&nb, [d_out, r])?, d_out, r);
        adapters.push((na, nb, a, b, d_in, d_out));
    }
    if let Some(extra) = st.names().into_iter().find(|n| !used.contains(*n)) {
        return Err(Error::tensor(extra.to_string(), format!("in {} does not fit the base model (no such adapted module)", file.display())));
    }
    let mut it = adapters.into_iter();
    for (prefix, lin) in model.layer_linears_mut() {
        if !cfg.target_modules.iter().any(|m| m == short(&prefix)) {
            continue;
        }
        let (na, nb, a, b, d_in, d_out) = it.next().expect("one per target");
        let lora_a = param(&na, Tensor::from_data(TensorData::new(a, [d_in, r]), (&device, dtype)));
        let lora_b = param(&nb, Tensor::from_data(TensorData::new(b, [r, d_out]), (&device, dtype)));
        lin.lora = Some(Lora { lora_a, lora_b, scale, dropout: cfg.dropout });
    }
    Ok((model, cfg))
}
