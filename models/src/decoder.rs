//! The decoder shared by Qwen2, Qwen3 and Llama.
//!
//! The families differ in a few switches ([`DecoderConfig::qkv_bias`], [`DecoderConfig::o_bias`],
//! [`DecoderConfig::mlp_bias`], [`DecoderConfig::qk_norm`], an explicit `head_dim`, the rotary
//! scaling [`DecoderConfig::rope_scaling`]), so one implementation serves all; the per-family
//! files ([`crate::qwen2`], [`crate::qwen3`], [`crate::llama`]) turn each `config.json` into a
//! [`DecoderConfig`]. Struct and field names equal Hugging Face state-dict names:
//! `model.embed_tokens.weight`, `model.layers.{i}.self_attn.{q,k,v,o}_proj.{weight,bias}`,
//! `model.layers.{i}.self_attn.{q,k}_norm.weight`, `model.layers.{i}.mlp.{gate,up,down}_proj.weight`,
//! `model.layers.{i}.{input,post_attention}_layernorm.weight`, `model.norm.weight`,
//! `lm_head.weight`.
//!
//! Deviations from the PyTorch reference, all deliberate:
//! - Linear weights are held as `[in, out]` (Burn's convention); Hugging Face stores `[out, in]`.
//!   [`crate::checkpoint`] transposes at load and save.
//! - Attention never materialises repeated K/V heads: queries are grouped per KV head instead
//!   (`[b, n_kv, groups * t, d]`), which gives the same products without copying the cache.
//! - Masked positions get a large negative bias instead of `-inf`, so that rows made only of
//!   padding stay finite.
//! As in the reference, RMSNorm, the attention softmax and the logits are computed in f32
//! whatever the weight dtype.
//!
//! Mixed precision: the weights may be held in a wider dtype than the one the model computes in
//! ([`CausalLm::compute_dtype`]). Every weight is then cast to the compute dtype where it is used
//! (a differentiable cast, so gradients reach the f32 master weights in f32), which is what
//! PyTorch's FSDP mixed precision and DeepSpeed's bf16 mode do. [`CausalLm::to_compute`] makes a
//! compute-dtype copy once, for generation.

use std::path::Path;

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Int, Tensor, TensorData};

use crate::rope::RopeScaling;
use crate::{Error, Result};

/// Bias added to masked attention scores (finite, so fully padded rows stay finite).
pub const MASK_VALUE: f32 = -1.0e9;

/// `t` in `dtype` (no work when it already is).
fn to_dtype<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if t.dtype() == dtype {
        t
    } else {
        t.cast(dtype)
    }
}

/// Architecture hyper-parameters, after the family-specific `config.json` was read.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// `rope_scaling` (`default`, `linear`, `llama3`); see [`RopeScaling::inv_freq`].
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    /// Qwen2: q/k/v projections have a bias. Qwen3, Llama: `attention_bias` (also on `o_proj`).
    pub qkv_bias: bool,
    /// Qwen3, Llama with `attention_bias`: `o_proj` has a bias too (never in Qwen2).
    pub o_bias: bool,
    /// Llama's `mlp_bias`: `gate_proj`, `up_proj` and `down_proj` have a bias.
    pub mlp_bias: bool,
    /// Qwen3: per-head RMSNorm on q and k before RoPE.
    pub qk_norm: bool,
}

impl DecoderConfig {
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |m: String| Err(Error::invalid(path, m));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return bad(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim % 2 != 0 {
            return bad(format!("head_dim ({}) must be even for rotary embeddings", self.head_dim));
        }
        if !(self.rms_norm_eps > 0.0) || !(self.rope_theta > 0.0) {
            return bad("rms_norm_eps and rope_theta must be positive".into());
        }
        Ok(())
    }

    /// Number of parameters (the tied head counted once).
    pub fn num_parameters(&self) -> usize {
        let (h, i, d) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let (nq, nkv) = (self.num_attention_heads * d, self.num_key_value_heads * d);
        let mut attn = h * nq + 2 * h * nkv + nq * h;
        if self.qkv_bias {
            attn += nq + 2 * nkv;
        }
        if self.o_bias {
            attn += h;
        }
        if self.qk_norm {
            attn += 2 * d;
        }
        let mut mlp = 3 * h * i;
        if self.mlp_bias {
            mlp += 2 * i + h;
        }
        let layer = attn + mlp + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * h };
        self.vocab_size * h + self.num_hidden_layers * layer + h + head
    }
}

/// `y = x W + b`, with `W` held as `[in, out]`.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `[d_in, d_out]` (the transpose of the Hugging Face tensor).
    pub weight: Param<Tensor<B, 2>>,
    /// `[d_out]`
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// A LoRA adapter (see [`crate::lora`]): adds `s · (x A) B`.
    pub lora: Option<crate::lora::Lora<B>>,
}

impl<B: Backend> Linear<B> {
    /// Computed in the dtype of `x` (the weight is cast when it is held wider). The leading
    /// dimensions are flattened first, so the product is one `[n, d_in] × [d_in, d_out]` matrix
    /// product (and its weight gradient one product too), not a batch of vector products.
    ///
    /// # Shapes
    /// - x: `[..., d_in]` → `[..., d_out]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        let mut dims = x.dims();
        let d_in = dims[D - 1];
        let n = dims[..D - 1].iter().product::<usize>();
        let w = to_dtype(self.weight.val(), dtype); // [d_in, d_out]
        let d_out = w.dims()[1];
        let x = x.reshape([n, d_in]);
        let lora_in = self.lora.as_ref().map(|_| x.clone());
        let mut y = x.matmul(w); // [n, d_out]
        if let Some(b) = &self.bias {
            y = y + to_dtype(b.val(), dtype).unsqueeze::<2>();
        }
        if let (Some(l), Some(x)) = (&self.lora, lora_in) {
            // PEFT's order: the base layer (bias included), then the scaled update.
            y = y + l.forward(x);
        }
        dims[D - 1] = d_out;
        y.reshape(dims)
    }
}

/// Root-mean-square layer norm, computed in f32 and cast back, as in the reference.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// `[d]`
    pub weight: Param<Tensor<B, 1>>,
    #[module(skip)]
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// # Shapes
    /// - x: `[..., d]` → `[..., d]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        let x = x.cast(FloatDType::F32);
        let var = x.clone().square().mean_dim(D - 1);
        let x = x * (var + self.eps).sqrt().recip();
        x.cast(dtype) * to_dtype(self.weight.val(), dtype).unsqueeze::<D>()
    }
}

/// Token embedding table.
#[derive(Module, Debug)]
pub struct Embedding<B: Backend> {
    /// `[vocab, hidden]` (same layout as Hugging Face).
    pub weight: Param<Tensor<B, 2>>,
}

impl<B: Backend> Embedding<B> {
    /// The selected rows in `dtype`.
    ///
    /// # Shapes
    /// - ids: `[b, t]` → `[b, t, hidden]`
    pub fn forward(&self, ids: Tensor<B, 2, Int>, dtype: DType) -> Tensor<B, 3> {
        let [b, t] = ids.dims();
        let hidden = self.weight.dims()[1];
        to_dtype(self.weight.val().select(0, ids.reshape([b * t])), dtype).reshape([b, t, hidden])
    }
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.down_proj.forward(silu(self.gate_proj.forward(x.clone())) * self.up_proj.forward(x))
    }
}

/// Rotary tables for one call, in the model dtype, laid out like the tensors they multiply:
/// `[b, t, heads, head_dim]` for the queries and `[b, t, kv_heads, head_dim]` for the keys.
/// They are applied before the heads move forward, and every product is between two
/// contiguous tensors of one shape: a `[b, t, 1, head_dim]` table broadcast over the heads
/// sends CPU backends to a scalar strided loop (flex: 4 % of a batched prefill).
#[derive(Debug, Clone)]
pub struct Rope<B: Backend> {
    pub cos_q: Tensor<B, 4>,
    pub sin_q: Tensor<B, 4>,
    pub cos_k: Tensor<B, 4>,
    pub sin_k: Tensor<B, 4>,
}

impl<B: Backend> Rope<B> {
    /// Build the tables for explicit positions (`positions[row * t + j]`), computed as the
    /// reference does: f32 inverse frequencies (with the config's rope scaling), f32 angles,
    /// cos/sin in f32, then cast.
    pub fn new(positions: &[usize], b: usize, t: usize, c: &DecoderConfig, dtype: DType, device: &B::Device) -> Self {
        let head_dim = c.head_dim;
        let inv = c.rope_scaling.inv_freq(c.rope_theta, head_dim);
        // One row of head_dim per position; the reference concatenates the angles: [a, a].
        let mut cos = Vec::with_capacity(b * t * head_dim);
        let mut sin = Vec::with_capacity(b * t * head_dim);
        for &p in positions {
            let angles: Vec<f32> = inv.iter().map(|&f| p as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
        // Each position's row repeated once per head: [b, t, heads, head_dim].
        let table = |rows: &[f32], heads: usize| {
            let v: Vec<f32> = rows.chunks(head_dim).flat_map(|r| std::iter::repeat_n(r, heads).flatten().copied()).collect();
            Tensor::<B, 4>::from_data(TensorData::new(v, [b, t, heads, head_dim]), (device, dtype))
        };
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        Rope { cos_q: table(&cos, nh), sin_q: table(&sin, nh), cos_k: table(&cos, nkv), sin_k: table(&sin, nkv) }
    }

    /// `x * cos + rotate_half(x) * sin`, with `rotate_half([x1, x2]) = [-x2, x1]`.
    ///
    /// # Shapes
    /// - x, cos, sin: `[b, t, heads, head_dim]`
    fn rotate(x: Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Tensor<B, 4> {
        let d = x.dims()[3];
        let x1 = x.clone().narrow(3, 0, d / 2);
        let x2 = x.clone().narrow(3, d / 2, d / 2);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * cos.clone() + rotated * sin.clone()
    }

    /// The queries rotated. x: `[b, t, heads, head_dim]`
    pub fn apply_q(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        Self::rotate(x, &self.cos_q, &self.sin_q)
    }

    /// The keys rotated. x: `[b, t, kv_heads, head_dim]`
    pub fn apply_k(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        Self::rotate(x, &self.cos_k, &self.sin_k)
    }
}

/// A pre-allocated key/value cache for every layer, written in place as tokens arrive.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    /// Per layer `(k, v)`, each `[b, n_kv, capacity, head_dim]`.
    pub layers: Vec<(Tensor<B, 4>, Tensor<B, 4>)>,
    /// Number of positions already written.
    pub len: usize,
    pub capacity: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn new(cfg: &DecoderConfig, batch: usize, capacity: usize, dtype: DType, device: &B::Device) -> Self {
        let shape = [batch, cfg.num_key_value_heads, capacity, cfg.head_dim];
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| (Tensor::zeros(shape, (device, dtype)), Tensor::zeros(shape, (device, dtype))))
            .collect();
        KvCache { layers, len: 0, capacity }
    }

    /// Keep only the given batch rows (finished rows stop costing compute).
    pub fn retain_rows(&mut self, rows: Tensor<B, 1, Int>) {
        for (k, v) in self.layers.iter_mut() {
            *k = k.clone().select(0, rows.clone());
            *v = v.clone().select(0, rows.clone());
        }
    }

    pub fn batch(&self) -> usize {
        self.layers.first().map(|(k, _)| k.dims()[0]).unwrap_or(0)
    }
}

/// One layer's cache, moved through the layer: `k`, `v` `[b, n_kv, capacity, d]`, `past`
/// positions already written.
#[derive(Debug)]
pub struct LayerCache<B: Backend> {
    pub k: Tensor<B, 4>,
    pub v: Tensor<B, 4>,
    pub past: usize,
}

/// Grouped-query self-attention.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    /// Qwen3 only.
    pub q_norm: Option<RmsNorm<B>>,
    /// Qwen3 only.
    pub k_norm: Option<RmsNorm<B>>,
    #[module(skip)]
    pub num_heads: usize,
    #[module(skip)]
    pub num_kv_heads: usize,
    #[module(skip)]
    pub head_dim: usize,
}

impl<B: Backend> Attention<B> {
    /// # Shapes
    /// - x: `[b, t, hidden]`
    /// - mask: `[b, 1 or heads, t * (past + t)]` in f32, 0 where attention is allowed, [`MASK_VALUE`] where not
    /// - returns `[b, t, hidden]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        mask: Tensor<B, 3>,
        cache: Option<LayerCache<B>>,
    ) -> (Tensor<B, 3>, Option<LayerCache<B>>) {
        let [b, t, _] = x.dims();
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let groups = nh / nkv;

        // 1. Project: [b, t, heads, d].
        let q = self.q_proj.forward(x.clone()).reshape([b, t, nh, d]);
        let k = self.k_proj.forward(x.clone()).reshape([b, t, nkv, d]);
        let v = self.v_proj.forward(x).reshape([b, t, nkv, d]);

        // 2. Qwen3: per-head RMSNorm of q and k, before RoPE.
        let q = match &self.q_norm {
            Some(n) => n.forward(q),
            None => q,
        };
        let k = match &self.k_norm {
            Some(n) => n.forward(k),
            None => k,
        };

        // 3. Rotary embedding, then heads first: [b, heads, t, d].
        let q = rope.apply_q(q).swap_dims(1, 2);
        let k = rope.apply_k(k).swap_dims(1, 2);
        let v = v.swap_dims(1, 2);

        // 4. KV cache: write the new positions in place, attend over everything written so far.
        //    The cache tensors are owned here (moved in), so backends update them without a copy.
        let (k, v, cache) = match cache {
            Some(LayerCache { k: kc, v: vc, past }) => {
                let end = past + t;
                let kc = kc.slice_assign([0..b, 0..nkv, past..end, 0..d], k);
                let vc = vc.slice_assign([0..b, 0..nkv, past..end, 0..d], v);
                let (k, v) = (kc.clone().narrow(2, 0, end), vc.clone().narrow(2, 0, end));
                (k, v, Some(LayerCache { k: kc, v: vc, past: end }))
            }
            None => (k, v, None),
        };
        let l = k.dims()[2];

        // 5. Scores per KV head with its query group stacked: [b, n_kv, groups * t, L].
        let q = q.reshape([b, nkv, groups * t, d]);
        let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(1.0 / (d as f64).sqrt());
        let dtype = scores.dtype();
        // 6. Mask and softmax in f32: [b, heads, t * L] + [b, 1, t * L] (one row of t * L shared
        //    by every head: the broadcast backends run as one contiguous pass), then [b, heads, t, L].
        let scores = scores.cast(FloatDType::F32).reshape([b, nh, t * l]) + mask;
        let probs = softmax(scores.reshape([b, nh, t, l]), 3).cast(dtype).reshape([b, nkv, groups * t, l]);

        // 7. Weighted values, heads back together: [b, t, heads * d].
        let out = probs.matmul(v).reshape([b, nh, t, d]).swap_dims(1, 2).reshape([b, t, nh * d]);
        (self.o_proj.forward(out), cache)
    }
}

#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub self_attn: Attention<B>,
    pub mlp: Mlp<B>,
    pub input_layernorm: RmsNorm<B>,
    pub post_attention_layernorm: RmsNorm<B>,
}

impl<B: Backend> DecoderLayer<B> {
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        mask: Tensor<B, 3>,
        cache: Option<LayerCache<B>>,
    ) -> (Tensor<B, 3>, Option<LayerCache<B>>) {
        let (a, cache) = self.self_attn.forward(self.input_layernorm.forward(x.clone()), rope, mask, cache);
        let h = x + a;
        (h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h)), cache)
    }
}

/// `model.*` in the Hugging Face state dict.
#[derive(Module, Debug)]
pub struct Model<B: Backend> {
    pub embed_tokens: Embedding<B>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
}

/// A causal language model: the decoder and its head (`lm_head`, or the embedding when tied).
#[derive(Module, Debug)]
pub struct CausalLm<B: Backend> {
    pub model: Model<B>,
    /// `None` when `tie_word_embeddings` is set.
    pub lm_head: Option<Linear<B>>,
    #[module(skip)]
    pub config: DecoderConfig,
    /// The dtype activations are computed in. Equal to the weights' dtype, or narrower when the
    /// weights are f32 master weights of a mixed-precision run.
    #[module(skip)]
    pub compute_dtype: DType,
}

/// Logits of a tied head in f32, from the embedding's transposed view (in any dtype; it is
/// cast to the dtype of `hidden`). A 2-D product on the view: backends pass its strides to the
/// matrix product, where a 3-D reshape of the view would copy the whole embedding.
///
/// # Shapes
/// - hidden: `[b, t, hidden]`, emb_t: `[hidden, vocab]` → `[b, t, vocab]`
pub fn tied_logits<B: Backend>(hidden: Tensor<B, 3>, emb_t: Tensor<B, 2>) -> Tensor<B, 3> {
    let [b, t, h] = hidden.dims();
    let emb_t = to_dtype(emb_t, hidden.dtype());
    let vocab = emb_t.dims()[1];
    hidden.reshape([b * t, h]).matmul(emb_t).reshape([b, t, vocab]).cast(FloatDType::F32)
}

/// Rows for which [`CausalLm::decode_head`] prepares a contiguous tied head (from 64 rows on
/// the product on the view is as fast or faster).
pub const DECODE_HEAD_ROWS: std::ops::RangeInclusive<usize> = 2..=32;
/// Fewest decode steps for which the contiguous copy pays for itself.
pub const DECODE_HEAD_MIN_STEPS: usize = 16;

/// A model's head prepared for generation ([`CausalLm::decode_head`]).
#[derive(Debug, Clone)]
pub struct DecodeHead<B: Backend> {
    /// A tied head's weight `[hidden, vocab]`, contiguous, in the compute dtype.
    emb_t: Option<Tensor<B, 2>>,
}

/// Where each token sits: its rotary position and which keys it may attend to.
#[derive(Debug, Clone)]
pub struct Positions {
    pub batch: usize,
    pub len: usize,
    /// Rotary position of token `j` of row `r` at `[r * len + j]`.
    pub positions: Vec<usize>,
    /// `[b, 1, len, past + len]`: 0 = attend, [`MASK_VALUE`] = masked.
    pub mask: Vec<f32>,
    pub keys: usize,
}

impl Positions {
    /// The additive mask as an f32 tensor `[b, 1, len * keys]`, shaped for the scores
    /// `[b, heads, len * keys]`: built once per forward, shared by every layer and head.
    pub fn mask_tensor<B: Backend>(&self, device: &B::Device) -> Tensor<B, 3> {
        Tensor::from_data(TensorData::new(self.mask.clone(), [self.batch, 1, self.len * self.keys]), (device, DType::F32))
    }

    /// The mask for a forward over `heads` attention heads: [`Self::mask_tensor`], or, for a
    /// batch of several rows run without autodiff, the same rows repeated per head
    /// `[b, heads, len * keys]` when that costs at most [`Self::EXPANDED_MASK_BUDGET`] elements.
    /// A mask broadcast over the middle (head) dimension sends CPU backends to a scalar
    /// strided loop (flex: ~3 % of a batch-8 prefill; batch 1 takes their fast path); under
    /// autodiff and beyond the budget the broadcast mask is kept, so training memory is as
    /// planned.
    pub fn mask_for<B: Backend>(&self, heads: usize, device: &B::Device) -> Tensor<B, 3> {
        let row = self.len * self.keys;
        if self.batch == 1 || B::ad_enabled(device) || self.batch * heads * row > Self::EXPANDED_MASK_BUDGET {
            return self.mask_tensor(device);
        }
        let v: Vec<f32> = self.mask.chunks(row).flat_map(|r| std::iter::repeat_n(r, heads).flatten().copied()).collect();
        Tensor::from_data(TensorData::new(v, [self.batch, heads, row]), (device, DType::F32))
    }

    /// 16M f32 elements (64 MiB).
    pub const EXPANDED_MASK_BUDGET: usize = 1 << 24;

    /// Plain causal attention over `len` tokens at positions `0..len` for every row.
    pub fn causal(batch: usize, len: usize) -> Self {
        let valid = vec![vec![true; len]; batch];
        let pos: Vec<Vec<usize>> = vec![(0..len).collect(); batch];
        Self::with_cache(&valid, &pos, 0)
    }

    /// General form. `key_valid[r]` has one flag per key position (`past + len` of them;
    /// `false` for padding), `positions[r]` one rotary position per new token. New token `j`
    /// sits at key index `past + j` and attends to valid keys at indices `<= past + j`.
    pub fn with_cache(key_valid: &[Vec<bool>], positions: &[Vec<usize>], past: usize) -> Self {
        let batch = key_valid.len();
        let len = positions.first().map(Vec::len).unwrap_or(0);
        let keys = past + len;
        let mut mask = Vec::with_capacity(batch * len * keys);
        for row in key_valid {
            for j in 0..len {
                let q = past + j;
                mask.extend((0..keys).map(|k| if k <= q && row[k] { 0.0 } else { MASK_VALUE }));
            }
        }
        Positions { batch, len, positions: positions.concat(), mask, keys }
    }

    /// Packed rows: each row holds several documents back to back (`segments[r]` lists their
    /// lengths, summing to at most `len`; the rest is padding). A token attends only to earlier
    /// tokens of its own document, and positions restart at 0 with each document, so a packed
    /// row computes exactly what the documents would compute one per row.
    pub fn packed(segments: &[Vec<usize>], len: usize) -> Self {
        let batch = segments.len();
        let mut positions = Vec::with_capacity(batch * len);
        let mut mask = Vec::with_capacity(batch * len * len);
        for segs in segments {
            // doc[j]: the document of token j (usize::MAX for padding); pos[j]: its position.
            let mut doc = vec![usize::MAX; len];
            let mut pos = vec![0usize; len];
            let mut at = 0;
            for (d, &n) in segs.iter().enumerate() {
                for i in 0..n {
                    doc[at + i] = d;
                    pos[at + i] = i;
                }
                at += n;
            }
            assert!(at <= len, "packed documents ({at} tokens) exceed the row length {len}");
            positions.extend_from_slice(&pos);
            for q in 0..len {
                // Padding queries attend to themselves only (their outputs are never used).
                mask.extend((0..len).map(|k| {
                    let ok = if doc[q] == usize::MAX { k == q } else { k <= q && doc[k] == doc[q] };
                    if ok { 0.0 } else { MASK_VALUE }
                }));
            }
        }
        Positions { batch, len, positions, mask, keys: len }
    }
}

/// Casts every floating-point parameter, keeping its id.
struct CastParams(DType);

impl<B: Backend> ModuleMapper<B> for CastParams {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let dtype = self.0;
        param.map(|t| to_dtype(t, dtype))
    }
}

impl<B: Backend> CausalLm<B> {
    /// The dtype the model computes in (activations, KV cache); see [`Self::compute_dtype`].
    pub fn dtype(&self) -> DType {
        self.compute_dtype
    }

    /// The dtype the weights are held in (f32 for the master weights of a mixed-precision run).
    pub fn weight_dtype(&self) -> DType {
        self.model.norm.weight.val().dtype()
    }

    /// Compute in `dtype` while the weights stay as they are held.
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute_dtype = dtype;
        self
    }

    /// A copy whose weights are held in the compute dtype (no cast per use): what generation
    /// runs on. Parameter ids are kept.
    pub fn to_compute(&self) -> Self {
        if self.weight_dtype() == self.compute_dtype && !self.has_adapters() {
            return self.clone();
        }
        self.clone().map(&mut CastParams(self.compute_dtype))
    }

    /// A copy whose weights are held in `dtype` (and which computes in it).
    pub fn cast_weights(&self, dtype: DType) -> Self {
        self.clone().map(&mut CastParams(dtype)).with_compute_dtype(dtype)
    }

    pub fn device(&self) -> B::Device {
        self.model.norm.weight.device()
    }

    /// Final hidden states (after the last norm).
    ///
    /// # Shapes
    /// - ids: `[b, t]` → `[b, t, hidden]`
    pub fn forward_hidden(&self, ids: Tensor<B, 2, Int>, pos: &Positions, mut cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
        let [b, t] = ids.dims();
        let device = ids.device();
        let dtype = self.dtype();
        let c = &self.config;
        let rope = Rope::new(&pos.positions, b, t, c, dtype, &device);
        let mask = pos.mask_for::<B>(c.num_attention_heads, &device);
        let past = cache.as_ref().map(|c| c.len).unwrap_or(0);
        // Move each layer's cache tensors out and back, so they are updated in place.
        let mut taken = cache.as_mut().map(|c| std::mem::take(&mut c.layers).into_iter());
        let mut updated = Vec::new();
        let mut x = self.model.embed_tokens.forward(ids, dtype);
        for layer in &self.model.layers {
            let layer_cache = taken.as_mut().and_then(|it| it.next()).map(|(k, v)| LayerCache { k, v, past });
            let (y, c) = layer.forward(x, &rope, mask.clone(), layer_cache);
            x = y;
            updated.extend(c.map(|c| (c.k, c.v)));
        }
        if let Some(c) = cache.as_mut() {
            c.layers = updated;
            c.len = past + t;
        }
        self.model.norm.forward(x)
    }

    /// Logits in f32.
    ///
    /// # Shapes
    /// - hidden: `[b, t, hidden]` → `[b, t, vocab]`
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let logits = match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => return tied_logits(hidden, self.model.embed_tokens.weight.val().transpose()),
        };
        logits.cast(FloatDType::F32)
    }

    /// The logits of the vocabulary entries `cols` only, in f32: `logits(hidden)` gathered at
    /// `cols`, up to float rounding (each is a dot product of the hidden state with one head
    /// row, summed in f32 and rounded to the compute dtype as the dense product's output is).
    ///
    /// Why: a top-k divergence needs the student's logits at the teacher's top-k ids only.
    /// Through the dense head its backward is two `[n, vocab]` products (the gradient of the
    /// logits is zero outside the k ids); here forward and backward touch `n · k` head rows.
    /// A head with a LoRA adapter or a bias takes the dense product and gathers.
    ///
    /// # Shapes
    /// - hidden: `[n, hidden]`, cols: `[n, k]` vocabulary ids → `[n, k]` (f32)
    pub fn logits_at(&self, hidden: Tensor<B, 2>, cols: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let [n, k] = cols.dims();
        let [_, d] = hidden.dims();
        let dtype = hidden.dtype();
        let ids = cols.clone().reshape([n * k]);
        let rows = match &self.lm_head {
            None => self.model.embed_tokens.weight.val().select(0, ids), // [n·k, hidden]
            Some(head) if head.lora.is_none() && head.bias.is_none() => head.weight.val().select(1, ids).transpose(),
            Some(_) => {
                let vocab = self.config.vocab_size;
                return self.logits(hidden.unsqueeze::<3>()).reshape([n, vocab]).gather(1, cols);
            }
        };
        // Rows in the compute dtype (as the dense product reads them), then widened: the
        // products of two bf16 numbers are exact in f32.
        let rows = to_dtype(to_dtype(rows, dtype), DType::F32).reshape([n, k, d]);
        let h = to_dtype(hidden, DType::F32).reshape([n, 1, d]);
        let logits = (rows * h).sum_dim(2).reshape([n, k]); // [n, k]
        to_dtype(to_dtype(logits, dtype), DType::F32)
    }

    /// The head as generation uses it: for a tied head, the embedding's transposed view made
    /// contiguous (and cast to the compute dtype) once, when `rows` rows will be decoded for
    /// up to `steps` tokens and that pays.
    ///
    /// Why: at 2–32 rows the product on the transposed view makes CPU backends repack the
    /// whole embedding every call (gemm on flex: 9.0 ms of a 9.0 ms head at 8 rows for a
    /// `[32768, 512]` table, 2.6 ms from a contiguous copy; the results are bit-identical), and a
    /// mixed-precision model would also cast it every token. The copy costs one embedding's
    /// memory for the generation and ~0.1 s per 64 MB, so it is made only for
    /// [`DECODE_HEAD_ROWS`] rows and at least [`DECODE_HEAD_MIN_STEPS`] steps. A single row keeps
    /// the view (a matrix–vector product, faster on the view).
    pub fn decode_head(&self, rows: usize, steps: usize) -> DecodeHead<B> {
        let emb_t = (self.lm_head.is_none() && DECODE_HEAD_ROWS.contains(&rows) && steps >= DECODE_HEAD_MIN_STEPS).then(|| {
            let w = to_dtype(self.model.embed_tokens.weight.val(), self.compute_dtype);
            let [vocab, hidden] = w.dims();
            // A reshape of a transposed view copies it into row-major order.
            w.transpose().reshape([hidden * vocab]).reshape([hidden, vocab])
        });
        DecodeHead { emb_t }
    }

    /// [`CausalLm::logits`] through a [`DecodeHead`]: equal results, the prepared weight used
    /// where it is faster (2 rows or more).
    ///
    /// # Shapes
    /// - hidden: `[b, t, hidden]` → `[b, t, vocab]` (f32)
    pub fn decode_logits(&self, head: &DecodeHead<B>, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, _] = hidden.dims();
        match &head.emb_t {
            Some(w) if b * t >= 2 => tied_logits(hidden, w.clone()),
            _ => self.logits(hidden),
        }
    }

    /// Logits of the positions that predict the continuation of one unpadded sequence: the
    /// `ids.len() - prompt_len` tokens after its first `prompt_len` (teacher forcing).
    ///
    /// # Shapes
    /// - returns `[ids.len() - prompt_len, vocab]` (f32)
    pub fn continuation_logits(&self, ids: &[u32], prompt_len: usize) -> Tensor<B, 2> {
        let (t, r) = (ids.len(), ids.len() - prompt_len);
        let device = self.device();
        let x = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), [1, t]), &device);
        // Position p - 1 predicts token p.
        let h = self.forward_hidden(x, &Positions::causal(1, t), None).narrow(1, prompt_len - 1, r);
        self.logits(h).reshape([r, self.config.vocab_size])
    }

    /// Logits of every position of un-padded sequences (positions `0..t`).
    ///
    /// # Shapes
    /// - ids: `[b, t]` → `[b, t, vocab]` (f32)
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [b, t] = ids.dims();
        let h = self.forward_hidden(ids, &Positions::causal(b, t), None);
        self.logits(h)
    }
}
