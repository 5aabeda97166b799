//! Hugging Face checkpoint folders: safetensors in (single or sharded, f32/bf16/f16) and out.
//!
//! One builder ([`build`]) constructs a [`CausalLm`] from any [`WeightSource`], so loading a
//! checkpoint and initialising random weights share the same list of tensor names and shapes;
//! [`hf_tensors`] walks the model back into Hugging Face names and layouts for saving.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::module::{Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use safetensors::tensor::{Dtype as StDtype, TensorView};
use safetensors::SafeTensors;
use serde_json::Value;

use crate::config::{ModelConfig, WeightDType};
use crate::decoder::{Attention, CausalLm, DecoderConfig, DecoderLayer, Embedding, Linear, Mlp, Model, RmsNorm};
use crate::{Error, Result};

/// Files of a Hugging Face folder that are not weights and that a saved model carries along.
pub const SIDE_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
];

/// Largest shard written by [`save_model`] (as `transformers`' default).
pub const MAX_SHARD_BYTES: usize = 5 * 1024 * 1024 * 1024;

#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// The dtype weights are held in (checkpoint tensors are converted).
    pub dtype: WeightDType,
}

/// Something that hands out weights by Hugging Face name, in Hugging Face layout, as f32.
pub trait WeightSource {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;
}

/// A seeded SplitMix64 stream (random weights, fresh LoRA adapters).
pub(crate) struct SplitMix {
    state: u64,
}

impl SplitMix {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix { state: seed ^ 0x9E37_79B9_7F4A_7C15 }
    }
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`.
    pub(crate) fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Seeded random weights (normal with std `0.02`, norms at 1): for benchmarks and pretraining.
pub struct RandomSource {
    rng: SplitMix,
    pub std: f32,
}

impl RandomSource {
    pub fn new(seed: u64) -> Self {
        RandomSource { rng: SplitMix::new(seed), std: 0.02 }
    }
    fn normal(&mut self) -> f32 {
        // Box–Muller.
        let u1 = ((self.rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = self.rng.uniform();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

impl WeightSource for RandomSource {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let n = shape.iter().product();
        if name.ends_with("norm.weight") {
            return Ok(vec![1.0; n]);
        }
        if name.ends_with(".bias") {
            return Ok(vec![0.0; n]);
        }
        Ok((0..n).map(|_| self.normal() * self.std).collect())
    }
}

/// Weights from safetensors files (memory-mapped).
struct SafetensorsSource<'a> {
    tensors: HashMap<String, (TensorView<'a>, PathBuf)>,
    used: HashSet<String>,
}

impl WeightSource for SafetensorsSource<'_> {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (view, file) = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::tensor(name, format!("missing from the checkpoint (expected shape {shape:?})")))?;
        if view.shape() != shape {
            return Err(Error::tensor(
                name,
                format!("has shape {:?} in {}, expected {shape:?}", view.shape(), file.display()),
            ));
        }
        self.used.insert(name.to_string());
        decode_f32(name, view, file)
    }
}

/// A safetensors tensor's values as f32 (F32, BF16 or F16 on disk).
pub(crate) fn decode_f32(name: &str, view: &TensorView<'_>, file: &Path) -> Result<Vec<f32>> {
        let bytes = view.data();
        let out = match view.dtype() {
            StDtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            StDtype::BF16 => {
                bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
            }
            StDtype::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => {
                return Err(Error::tensor(
                    name,
                    format!("unsupported dtype {other:?} in {} (expected F32, BF16 or F16)", file.display()),
                ))
            }
        };
        Ok(out)
}

/// Builds modules from a [`WeightSource`], converting Hugging Face layouts to ours.
struct Builder<'s, B: Backend> {
    src: &'s mut dyn WeightSource,
    device: B::Device,
    dtype: DType,
}

impl<B: Backend> Builder<'_, B> {
    fn tensor<const D: usize>(&mut self, name: &str, shape: [usize; D]) -> Result<Param<Tensor<B, D>>> {
        let data = self.src.get(name, &shape)?;
        let t = Tensor::<B, D>::from_data(TensorData::new(data, shape), (&self.device, self.dtype));
        Ok(param(name, t))
    }

    /// HF `[out, in]` → ours `[in, out]`.
    fn linear(&mut self, prefix: &str, d_in: usize, d_out: usize, bias: bool) -> Result<Linear<B>> {
        let name = format!("{prefix}.weight");
        let w = self.src.get(&name, &[d_out, d_in])?;
        let t = transpose(&w, d_out, d_in);
        let weight = param(&name, Tensor::from_data(TensorData::new(t, [d_in, d_out]), (&self.device, self.dtype)));
        let bias = if bias { Some(self.tensor(&format!("{prefix}.bias"), [d_out])?) } else { None };
        Ok(Linear { weight, bias, lora: None })
    }

    fn norm(&mut self, prefix: &str, d: usize, eps: f64) -> Result<RmsNorm<B>> {
        Ok(RmsNorm { weight: self.tensor(&format!("{prefix}.weight"), [d])?, eps })
    }

    fn model(&mut self, c: &DecoderConfig) -> Result<CausalLm<B>> {
        let (h, d) = (c.hidden_size, c.head_dim);
        let (nq, nkv) = (c.num_attention_heads * d, c.num_key_value_heads * d);
        let embed_tokens = Embedding { weight: self.tensor("model.embed_tokens.weight", [c.vocab_size, h])? };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let self_attn = Attention {
                q_proj: self.linear(&format!("{p}.self_attn.q_proj"), h, nq, c.qkv_bias)?,
                k_proj: self.linear(&format!("{p}.self_attn.k_proj"), h, nkv, c.qkv_bias)?,
                v_proj: self.linear(&format!("{p}.self_attn.v_proj"), h, nkv, c.qkv_bias)?,
                o_proj: self.linear(&format!("{p}.self_attn.o_proj"), nq, h, c.o_bias)?,
                q_norm: if c.qk_norm { Some(self.norm(&format!("{p}.self_attn.q_norm"), d, c.rms_norm_eps)?) } else { None },
                k_norm: if c.qk_norm { Some(self.norm(&format!("{p}.self_attn.k_norm"), d, c.rms_norm_eps)?) } else { None },
                num_heads: c.num_attention_heads,
                num_kv_heads: c.num_key_value_heads,
                head_dim: d,
            };
            let mlp = Mlp {
                gate_proj: self.linear(&format!("{p}.mlp.gate_proj"), h, c.intermediate_size, c.mlp_bias)?,
                up_proj: self.linear(&format!("{p}.mlp.up_proj"), h, c.intermediate_size, c.mlp_bias)?,
                down_proj: self.linear(&format!("{p}.mlp.down_proj"), c.intermediate_size, h, c.mlp_bias)?,
            };
            layers.push(DecoderLayer {
                self_attn,
                mlp,
                input_layernorm: self.norm(&format!("{p}.input_layernorm"), h, c.rms_norm_eps)?,
                post_attention_layernorm: self.norm(&format!("{p}.post_attention_layernorm"), h, c.rms_norm_eps)?,
            });
        }
        let norm = self.norm("model.norm", h, c.rms_norm_eps)?;
        let lm_head = if c.tie_word_embeddings { None } else { Some(self.linear("lm_head", h, c.vocab_size, false)?) };
        Ok(CausalLm { model: Model { embed_tokens, layers, norm }, lm_head, config: c.clone(), compute_dtype: self.dtype })
    }
}

/// A parameter whose id is derived from its Hugging Face name (FNV-1a), so that optimiser state
/// saved against one load of a checkpoint applies to the next load of it (resume).
pub(crate) fn param<B: Backend, const D: usize>(name: &str, t: Tensor<B, D>) -> Param<Tensor<B, D>> {
    let id = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
    Param::initialized(ParamId::from(id), t.require_grad())
}

pub(crate) fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w[r * cols + c];
        }
    }
    t
}

/// Build a model from any weight source (checkpoint, random init).
pub fn build<B: Backend>(cfg: &DecoderConfig, src: &mut dyn WeightSource, dtype: WeightDType, device: &B::Device) -> Result<CausalLm<B>> {
    Builder::<B> { src, device: device.clone(), dtype: dtype.burn() }.model(cfg)
}

/// Seeded random weights for a config (benchmarks, from-scratch pretraining).
pub fn random_model<B: Backend>(cfg: &DecoderConfig, seed: u64, dtype: WeightDType, device: &B::Device) -> Result<CausalLm<B>> {
    build(cfg, &mut RandomSource::new(seed), dtype, device)
}

/// The safetensors files of a folder: `model.safetensors`, or the shards listed by
/// `model.safetensors.index.json`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::Json { path: index.clone(), err: e })?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::invalid(&index, "missing object `weight_map`"))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for (name, f) in map {
            let f = f.as_str().ok_or_else(|| Error::invalid(&index, format!("weight_map[{name}] is not a file name")))?;
            let p = dir.join(f);
            if !files.contains(&p) {
                files.push(p);
            }
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(Error::invalid(dir, "no model.safetensors or model.safetensors.index.json in this folder"))
}

/// A missing folder that an interrupted [`save_model`] was replacing is put back.
pub fn restore_interrupted(dir: &Path) -> Result<()> {
    match (dir.exists(), dir.parent().filter(|p| !p.as_os_str().is_empty()), dir.file_name()) {
        (false, Some(parent), Some(name)) => recover_leftovers(parent, Some(&name.to_string_lossy())),
        _ => Ok(()),
    }
}

/// Load a Hugging Face folder: `config.json` and its safetensors weights.
pub fn load_model<B: Backend>(dir: &Path, opts: &LoadOptions, device: &B::Device) -> Result<(CausalLm<B>, ModelConfig)> {
    restore_interrupted(dir)?;
    if !dir.is_dir() {
        return Err(Error::invalid(dir, "model folder does not exist or is not a folder"));
    }
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(Error::invalid(&config_path, "missing (a Hugging Face model folder has a config.json)"));
    }
    let config = ModelConfig::from_file(&config_path)?;
    let dcfg = config.decoder(&config_path)?;
    if !B::supports_dtype(device, opts.dtype.burn()) {
        return Err(Error::Input(format!(
            "dtype {} is not supported by this backend; use f32 here (bf16 runs on the cuda and wgpu backends)",
            opts.dtype.hf_name()
        )));
    }

    let files = weight_files(dir)?;
    let maps: Vec<(PathBuf, memmap2::Mmap)> = files
        .into_iter()
        .map(|p| {
            let f = File::open(&p).map_err(|e| Error::io(&p, e))?;
            // SAFETY: the file is opened read-only; we only read it while the map lives.
            let m = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(&p, e))?;
            Ok((p, m))
        })
        .collect::<Result<_>>()?;
    let mut tensors = HashMap::new();
    for (p, m) in &maps {
        let st = SafeTensors::deserialize(m).map_err(|e| Error::invalid(p, format!("not a valid safetensors file: {e}")))?;
        for (name, view) in st.tensors() {
            tensors.insert(name, (view, p.clone()));
        }
    }
    let mut src = SafetensorsSource { tensors, used: HashSet::new() };
    let model = build(&dcfg, &mut src, opts.dtype, device)?;
    let mut unused: Vec<&String> = src.tensors.keys().filter(|k| !src.used.contains(*k)).collect();
    unused.sort();
    if !unused.is_empty() {
        tracing::warn!("{}: {} tensor(s) not used by the model, e.g. `{}`", dir.display(), unused.len(), unused[0]);
    }
    tracing::info!(
        "loaded {} ({} layers, {:.1}M parameters, {:?})",
        dir.display(),
        dcfg.num_hidden_layers,
        dcfg.num_parameters() as f64 / 1e6,
        opts.dtype
    );
    Ok((model, config))
}

/// One tensor in Hugging Face name and layout.
pub struct HfTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().expect("f32 data after convert")
}

/// Every tensor of the model under its Hugging Face name, in Hugging Face layout, as f32.
pub fn hf_tensors<B: Backend>(m: &CausalLm<B>) -> Vec<HfTensor> {
    let mut out = Vec::new();
    let vec1 = |name: String, p: &Param<Tensor<B, 1>>| {
        let t = p.val();
        HfTensor { name, shape: t.dims().to_vec(), data: host(t) }
    };
    let mut linears: Vec<(String, &Linear<B>)> = Vec::new();
    let mut norms: Vec<(String, &RmsNorm<B>)> = vec![("model.norm".into(), &m.model.norm)];
    for (i, l) in m.model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        let a = &l.self_attn;
        for (n, lin) in [("q_proj", &a.q_proj), ("k_proj", &a.k_proj), ("v_proj", &a.v_proj), ("o_proj", &a.o_proj)] {
            linears.push((format!("{p}.self_attn.{n}"), lin));
        }
        for (n, lin) in [("gate_proj", &l.mlp.gate_proj), ("up_proj", &l.mlp.up_proj), ("down_proj", &l.mlp.down_proj)] {
            linears.push((format!("{p}.mlp.{n}"), lin));
        }
        if let (Some(q), Some(k)) = (&a.q_norm, &a.k_norm) {
            norms.push((format!("{p}.self_attn.q_norm"), q));
            norms.push((format!("{p}.self_attn.k_norm"), k));
        }
        norms.push((format!("{p}.input_layernorm"), &l.input_layernorm));
        norms.push((format!("{p}.post_attention_layernorm"), &l.post_attention_layernorm));
    }
    if let Some(head) = &m.lm_head {
        linears.push(("lm_head".into(), head));
    }
    for (n, norm) in norms {
        out.push(vec1(format!("{n}.weight"), &norm.weight));
    }
    for (n, lin) in linears {
        if let Some(b) = &lin.bias {
            out.push(vec1(format!("{n}.bias"), b));
        }
        // ours [in, out] → HF [out, in]; an adapter is merged in (W + s·A·B, in f32).
        let [d_in, d_out] = lin.weight.dims();
        let w = match &lin.lora {
            Some(l) => lin.weight.val().cast(burn::tensor::FloatDType::F32) + l.delta(),
            None => lin.weight.val(),
        };
        let data = transpose(&host(w), d_in, d_out);
        out.push(HfTensor { name: format!("{n}.weight"), shape: vec![d_out, d_in], data });
    }
    let e = m.model.embed_tokens.weight.val();
    out.push(HfTensor { name: "model.embed_tokens.weight".into(), shape: e.dims().to_vec(), data: host(e) });
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn encode(data: &[f32], dtype: WeightDType) -> Vec<u8> {
    match dtype {
        WeightDType::F32 => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        WeightDType::BF16 => data.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
    }
}

/// The dtype a checkpoint was stored in, from `config.json` (`dtype` or `torch_dtype`).
pub fn config_dtype(cfg: &ModelConfig) -> Option<WeightDType> {
    let raw = cfg.raw();
    let s = raw.get("dtype").or_else(|| raw.get("torch_dtype")).and_then(Value::as_str)?;
    WeightDType::parse(s).ok()
}

/// Save a model as a Hugging Face folder: `config.json` (the original fields, with the dtype
/// updated), safetensors with HF names and layouts (sharded above [`MAX_SHARD_BYTES`]), and the
/// tokenizer/generation files copied from `side_files_from`.
///
/// The folder is written under a temporary name next to `out` and renamed into place, so a
/// crash never leaves a half-written checkpoint. An existing `out` is an error unless
/// `overwrite` is set, in which case it is replaced only after the new folder is complete, and
/// only when it is a model folder (or empty): never a file or someone's other folder. What an
/// interrupted earlier call left next to `out` is cleaned up first ([`recover_leftovers`]).
pub fn save_model<B: Backend>(
    model: &CausalLm<B>,
    config: &ModelConfig,
    side_files_from: Option<&Path>,
    out: &Path,
    dtype: WeightDType,
    overwrite: bool,
) -> Result<()> {
    write_atomically(out, overwrite, |tmp| write_folder(model, config, side_files_from, tmp, dtype))
}

/// Write a folder under a temporary name next to `out` with `write`, then rename it into place:
/// a crash never leaves a half-written folder (leftovers of killed writes are cleaned first). An
/// existing `out` is an error unless `overwrite`, and is then replaced only after the new folder
/// is complete, and only when it is a model or adapter folder (or empty).
pub(crate) fn write_atomically(out: &Path, overwrite: bool, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let file_name = out.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "model".into());
    recover_leftovers(parent, Some(&file_name))?;
    if out.exists() && !overwrite {
        return Err(Error::invalid(out, "already exists (refusing to overwrite it)"));
    }
    if out.exists() && !is_replaceable(out) {
        return Err(Error::invalid(out, "exists and is not a model folder (nor an adapter folder: no config.json or adapter_config.json); refusing to replace it"));
    }
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let tmp = parent.join(format!(".{file_name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result = write(&tmp).and_then(|_| {
        if out.exists() {
            let old = parent.join(format!(".{file_name}.old-{}", std::process::id()));
            std::fs::rename(out, &old).map_err(|e| Error::io(out, e))?;
            std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))
        } else {
            std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))
        }
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn write_folder<B: Backend>(
    model: &CausalLm<B>,
    config: &ModelConfig,
    side_files_from: Option<&Path>,
    dir: &Path,
    dtype: WeightDType,
) -> Result<()> {
    // config.json: every original field, dtype updated.
    let mut raw = config.raw().clone();
    if let Some(obj) = raw.as_object_mut() {
        let mut set = false;
        for key in ["dtype", "torch_dtype"] {
            if obj.contains_key(key) {
                obj.insert(key.into(), Value::String(dtype.hf_name().into()));
                set = true;
            }
        }
        if !set {
            obj.insert("torch_dtype".into(), Value::String(dtype.hf_name().into()));
        }
    }
    let cfg_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&raw).expect("JSON value serialises");
    std::fs::write(&cfg_path, text + "\n").map_err(|e| Error::io(&cfg_path, e))?;

    // Weights, sharded greedily in name order.
    let st_dtype = match dtype {
        WeightDType::F32 => StDtype::F32,
        WeightDType::BF16 => StDtype::BF16,
    };
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> =
        hf_tensors(model).into_iter().map(|t| (t.name, t.shape, encode(&t.data, dtype))).collect();
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut size = 0;
    for (i, (_, _, bytes)) in tensors.iter().enumerate() {
        if size > 0 && size + bytes.len() > MAX_SHARD_BYTES {
            shards.push(vec![]);
            size = 0;
        }
        shards.last_mut().unwrap().push(i);
        size += bytes.len();
    }
    let metadata: Option<HashMap<String, String>> = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut total = 0usize;
    for (s, idx) in shards.iter().enumerate() {
        let fname = if n == 1 { "model.safetensors".to_string() } else { format!("model-{:05}-of-{:05}.safetensors", s + 1, n) };
        let mut views = Vec::new();
        for &i in idx {
            let (name, shape, bytes) = &tensors[i];
            let view = TensorView::new(st_dtype, shape.clone(), bytes)
                .map_err(|e| Error::tensor(name, format!("cannot serialise: {e}")))?;
            views.push((name.clone(), view));
            weight_map.insert(name.clone(), fname.clone());
            total += bytes.len();
        }
        let path = dir.join(&fname);
        safetensors::serialize_to_file(views, metadata.clone(), &path)
            .map_err(|e| Error::invalid(&path, format!("cannot write safetensors: {e}")))?;
    }
    if n > 1 {
        let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        let path = dir.join("model.safetensors.index.json");
        std::fs::write(&path, serde_json::to_string_pretty(&index).unwrap()).map_err(|e| Error::io(&path, e))?;
    }

    if let Some(src) = side_files_from {
        for f in SIDE_FILES {
            let from = src.join(f);
            if from.is_file() {
                std::fs::copy(&from, dir.join(f)).map_err(|e| Error::io(&from, e))?;
            }
        }
    }
    Ok(())
}

/// A folder `save_model` may replace: a model folder (it has `config.json`) or an empty one.
fn is_replaceable(out: &Path) -> bool {
    out.is_dir() && (out.join("config.json").is_file() || out.join("adapter_config.json").is_file() || std::fs::read_dir(out).map(|mut d| d.next().is_none()).unwrap_or(false))
}

/// Whether process `pid` still runs (where `/proc` tells; elsewhere it is taken as gone).
fn pid_alive(pid: u32) -> bool {
    pid == std::process::id() || (Path::new("/proc/self").exists() && Path::new(&format!("/proc/{pid}")).exists())
}

/// Clean what interrupted atomic writes left in `parent` (for the entry `name`, or any):
/// `.NAME.tmp-PID` folders of processes that are gone are removed, and `.NAME.old-PID` (the
/// folder a swap was replacing when it was killed) is put back as `NAME` when `NAME` is missing,
/// else removed. So a kill at any moment of [`save_model`] leaves the old or the new folder.
pub fn recover_leftovers(parent: &Path, name: Option<&str>) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(parent) else { return Ok(()) };
    let mut found: Vec<(String, bool, PathBuf)> = Vec::new();
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().to_string();
        let Some(rest) = file.strip_prefix('.') else { continue };
        for (tag, old) in [(".tmp-", false), (".old-", true)] {
            let Some((target, pid)) = rest.rsplit_once(tag) else { continue };
            let ours = name.is_none_or(|n| n == target);
            if ours && pid.parse::<u32>().is_ok_and(|p| !pid_alive(p)) {
                found.push((target.to_string(), old, e.path()));
            }
        }
    }
    found.sort_by_key(|(_, old, _)| !old); // restore before removing
    for (target, old, path) in found {
        let dest = parent.join(&target);
        if old && !dest.exists() {
            tracing::warn!("{}: restoring the folder an interrupted write was replacing", dest.display());
            std::fs::rename(&path, &dest).map_err(|e| Error::io(&path, e))?;
        } else {
            tracing::info!("removing {}, left by an interrupted write", path.display());
            let removed = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            removed.map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

/// A fingerprint of a model folder: SHA-256 over `config.json`, and per weight file its name,
/// size, safetensors header and 16 evenly spaced 4 KiB samples of its data. Cheap on any size,
/// it changes with the config, the tensor list, the dtypes and shapes, and with retrained weights.
pub fn fingerprint(dir: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::{Read, Seek, SeekFrom};
    let mut h = Sha256::new();
    let config = dir.join("config.json");
    h.update(std::fs::read(&config).map_err(|e| Error::io(&config, e))?);
    for p in weight_files(dir)? {
        let mut f = File::open(&p).map_err(|e| Error::io(&p, e))?;
        let len = f.metadata().map_err(|e| Error::io(&p, e))?.len();
        let mut n = [0u8; 8];
        f.read_exact(&mut n).map_err(|e| Error::io(&p, e))?;
        let header_len = u64::from_le_bytes(n).min(len.saturating_sub(8));
        let mut header = vec![0u8; header_len as usize];
        f.read_exact(&mut header).map_err(|e| Error::io(&p, e))?;
        h.update(p.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_default());
        h.update(len.to_le_bytes());
        h.update(&header);
        let (start, data) = (8 + header_len, len - 8 - header_len);
        let mut block = vec![0u8; 4096.min(data as usize)];
        for k in 0..16 {
            f.seek(SeekFrom::Start(start + (data - block.len() as u64) * k / 15)).map_err(|e| Error::io(&p, e))?;
            f.read_exact(&mut block).map_err(|e| Error::io(&p, e))?;
            h.update(&block);
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
