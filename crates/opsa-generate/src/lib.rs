//! `opsa-generate`: batched, KV-cached sampling with per-token log-probs, and teacher-forced
//! scoring of given responses.
//!
//! How a batch runs ([`generate`]):
//! 1. Prompts of different lengths are left-padded to the longest; each row keeps its own rotary
//!    positions (`0..len` on its real tokens) and padding keys are masked, so padding changes no
//!    row's result.
//! 2. One pre-allocated [`KvCache`] of `longest prompt + max_new_tokens` positions is written in
//!    place as tokens arrive.
//! 3. Each step samples the whole batch on the device ([`sample`]): temperature → top-k → top-p
//!    → inverse-CDF draw with one uniform per row. The uniforms come from a per-prompt SplitMix64
//!    stream seeded from `(seed, prompt index)`, so a prompt's sample does not depend on the
//!    batch it was run in or on the backend's RNG.
//! 4. Rows that finish (EOS id, stop string, or `max_new_tokens`) are dropped from the batch and
//!    from the cache, so they stop costing compute.
//!
//! Log-probs are always those of the raw (untempered, unfiltered) model distribution.

use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use opsa_models::decoder::{DecodeHead, Positions};
use opsa_models::{CausalLm, HfTokenizer, KvCache};

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Model(#[from] opsa_models::Error),
    /// The model's output holds NaN or infinity (broken or overflowing weights).
    #[error("the model produced non-finite logits (NaN or infinity) {0}; its weights hold NaN/inf or its activations overflow")]
    NonFinite(String),
}

/// One check per forward, on values already copied to the host: NaN or infinite log-probs mean
/// the logits were not finite (a NaN anywhere in a row makes the row's log-softmax NaN).
fn check_finite(logprobs: &[f32], at: impl FnOnce() -> String) -> Result<()> {
    match logprobs.iter().all(|x| x.is_finite()) {
        true => Ok(()),
        false => Err(GenerateError::NonFinite(at())),
    }
}

pub type Result<T> = std::result::Result<T, GenerateError>;

/// Sampling settings. `temperature == 0` is greedy decoding.
#[derive(Debug, Clone)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1.0 disables top-p; must lie in (0, 1].
    pub top_p: f32,
    pub max_new_tokens: usize,
    pub seed: u64,
    /// Generation stops when the decoded text contains one of these (excluded from `text`).
    pub stop_strings: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, max_new_tokens: 256, seed: 0, stop_strings: vec![] }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(GenerateError::Input(format!("top-p must lie in (0, 1], got {}", self.top_p)));
        }
        if !(self.temperature >= 0.0) || !self.temperature.is_finite() {
            return Err(GenerateError::Input(format!("temperature must be a finite number >= 0, got {}", self.temperature)));
        }
        if self.max_new_tokens == 0 {
            return Err(GenerateError::Input("max_new_tokens must be at least 1 (with 0 every response is empty and counted as truncated)".into()));
        }
        Ok(())
    }
    pub fn greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS id or a stop string ended the response.
    Stop,
    /// `max_new_tokens` (or the model's context) was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// One prompt's result.
#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    /// Generated ids, including the EOS id that ended the response, if any.
    pub token_ids: Vec<u32>,
    /// Raw-model log-probability of each generated id.
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
    /// Decoded response (special tokens skipped, cut before a stop string); empty without a tokenizer.
    pub text: String,
}

/// A small, seedable generator (SplitMix64) for the per-row uniforms.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// The stream of prompt `index` under `seed`.
    pub fn for_row(seed: u64, index: u64) -> Self {
        let mut s = SplitMix64(seed ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03));
        s.next_u64();
        s
    }
}

/// Pick the next token of every row on the device.
///
/// # Shapes
/// - logits: `[b, vocab]` (f32, raw)
/// - uniforms: one per row (ignored when greedy)
/// - returns `(ids [b], raw log-probs [b])`, on the host
pub fn sample<B: Backend>(logits: Tensor<B, 2>, params: &SamplingParams, uniforms: &[f32]) -> (Vec<u32>, Vec<f32>) {
    let [b, vocab] = logits.dims();
    let device = logits.device();
    let logp = log_softmax(logits.clone(), 1);
    let ids: Tensor<B, 2, Int> = if params.greedy() {
        logits.argmax(1)
    } else {
        let scaled = logits.div_scalar(params.temperature);
        let k = if params.top_k > 0 { params.top_k.min(vocab) } else { vocab };
        // Candidates sorted by descending probability: [b, k].
        let (vals, idx) = if k < vocab || params.top_p < 1.0 {
            let (v, i) = if k < vocab { scaled.topk_with_indices(k, 1) } else { scaled.sort_descending_with_indices(1) };
            (v, Some(i))
        } else {
            (scaled, None)
        };
        let mut probs = softmax(vals, 1);
        if params.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p: drop a token when the mass
            // strictly before it already reaches top_p (the first token is always kept).
            let before = probs.clone().cumsum(1) - probs.clone();
            probs = probs.mask_fill(before.greater_equal_elem(params.top_p), 0.0);
        }
        // Inverse CDF: the first index whose cumulative mass reaches u * total.
        let cdf = probs.cumsum(1);
        let n = cdf.dims()[1];
        let total = cdf.clone().narrow(1, n - 1, 1);
        let u = Tensor::<B, 2>::from_data(TensorData::new(uniforms.to_vec(), [b, 1]), (&device, cdf.dtype()));
        let choice = cdf.lower(total * u).int().sum_dim(1).clamp_max((n - 1) as i64);
        match idx {
            Some(idx) => idx.gather(1, choice),
            None => choice,
        }
    };
    let lp = logp.gather(1, ids.clone());
    let ids: Vec<u32> = ids.into_data().convert::<i64>().to_vec::<i64>().unwrap().into_iter().map(|x| x as u32).collect();
    let lp: Vec<f32> = lp.into_data().convert::<f32>().to_vec::<f32>().unwrap();
    (ids, lp)
}

fn int_tensor<B: Backend, const D: usize>(data: Vec<i64>, shape: [usize; D], device: &B::Device) -> Tensor<B, D, Int> {
    Tensor::from_data(TensorData::new(data, shape), device)
}

/// Generate a response for every prompt (already tokenised). `row_index[i]` is prompt `i`'s
/// index in the whole job (it seeds that prompt's random stream); pass `0..n` when in doubt.
/// With a tokenizer, stop strings are checked and `text` is filled.
pub fn generate<B: Backend>(
    model: &CausalLm<B>,
    prompts: &[Vec<u32>],
    row_index: &[u64],
    params: &SamplingParams,
    eos_ids: &[u32],
    tokenizer: Option<&HfTokenizer>,
) -> Result<Vec<Generation>> {
    params.validate()?;
    let cfg = &model.config;
    let n = prompts.len();
    if n == 0 {
        return Ok(vec![]);
    }
    validate_prompts(model, prompts)?;
    let device = model.device();
    // Never past the model's context: a row stops with `length` at max_position_embeddings.
    let max_new = params.max_new_tokens.min(cfg.max_position_embeddings - prompts.iter().map(Vec::len).min().unwrap());
    let mut out: Vec<Generation> = prompts
        .iter()
        .map(|p| Generation {
            prompt_ids: p.clone(),
            token_ids: vec![],
            logprobs: vec![],
            finish_reason: FinishReason::Length,
            text: String::new(),
        })
        .collect();
    if max_new == 0 {
        return Ok(out);
    }
    let stop_window = params.stop_strings.iter().map(String::len).max().unwrap_or(0) + 4;
    let mut rngs: Vec<SplitMix64> = row_index.iter().map(|&i| SplitMix64::for_row(params.seed, i)).collect();

    // 1–2. Left-padded prefill into a cache sized for the whole job.
    let head = model.decode_head(n, max_new);
    let (mut logits, mut cache, mut key_valid) = prefill(model, &head, prompts, max_new);
    let mut next_pos: Vec<usize> = prompts.iter().map(Vec::len).collect();

    // `active[slot]` = index into `out` of the row in batch slot `slot`.
    let mut active: Vec<usize> = (0..n).collect();
    for step in 0..max_new {
        // 3. Sample every active row.
        let uniforms: Vec<f32> = active.iter().map(|&r| rngs[r].uniform()).collect();
        let (next, lps) = sample(logits, params, &uniforms);
        check_finite(&lps, || format!("at generated token {}", step + 1))?;
        let mut keep = Vec::with_capacity(active.len());
        for (slot, &r) in active.iter().enumerate() {
            let g = &mut out[r];
            g.token_ids.push(next[slot]);
            g.logprobs.push(lps[slot]);
            let mut done = false;
            if eos_ids.contains(&next[slot]) {
                g.finish_reason = FinishReason::Stop;
                done = true;
            } else if let (Some(tok), false) = (tokenizer, params.stop_strings.is_empty()) {
                // Only a stop string ending in the newest token is new: decode a tail long
                // enough to hold the longest one (every token is at least one byte; a few more
                // for a character split across tokens), not the whole response every step.
                let tail = g.token_ids.len().saturating_sub(stop_window);
                let text = tok.decode(&g.token_ids[tail..], true)?;
                if params.stop_strings.iter().any(|s| text.contains(s.as_str())) {
                    g.finish_reason = FinishReason::Stop;
                    done = true;
                }
            }
            if !done && next_pos[r] + 1 >= cfg.max_position_embeddings {
                done = true; // context full: `length`
            }
            if !done {
                keep.push(slot);
            }
        }
        if keep.is_empty() || step + 1 == max_new {
            break;
        }
        // 4. Drop finished rows from the batch and the cache.
        if keep.len() < active.len() {
            let rows = int_tensor::<B, 1>(keep.iter().map(|&s| s as i64).collect(), [keep.len()], &device);
            cache.retain_rows(rows);
            key_valid = keep.iter().map(|&s| key_valid[s].clone()).collect();
            active = keep.iter().map(|&s| active[s]).collect();
        }
        // 5. Decode one token for every active row.
        let b = active.len();
        let last: Vec<i64> = active.iter().map(|&r| *out[r].token_ids.last().unwrap() as i64).collect();
        for kv in key_valid.iter_mut() {
            kv.push(true);
        }
        let step_pos: Vec<Vec<usize>> = active.iter().map(|&r| vec![next_pos[r]]).collect();
        for &r in &active {
            next_pos[r] += 1;
        }
        let pos = Positions::with_cache(&key_valid, &step_pos, cache.len);
        let hidden = model.forward_hidden(int_tensor(last, [b, 1], &device), &pos, Some(&mut cache));
        logits = model.decode_logits(&head, hidden).reshape([b, cfg.vocab_size]);
    }

    if let Some(tok) = tokenizer {
        for g in out.iter_mut() {
            let mut text = tok.decode(&g.token_ids, true)?;
            if let Some(cut) = params.stop_strings.iter().filter_map(|s| text.find(s.as_str())).min() {
                text.truncate(cut);
            }
            g.text = text;
        }
    }
    Ok(out)
}

/// Prompts must be non-empty, fit the context and use only ids the model has.
fn validate_prompts<B: Backend>(model: &CausalLm<B>, prompts: &[Vec<u32>]) -> Result<()> {
    validate_sequences(model, prompts, |i| format!("prompt {i}"))
}

/// [`validate_prompts`] with the error naming sequence `i` as `name(i)`.
fn validate_sequences<B: Backend>(model: &CausalLm<B>, seqs: &[Vec<u32>], name: impl Fn(usize) -> String) -> Result<()> {
    let cfg = &model.config;
    for (i, p) in seqs.iter().enumerate() {
        if p.is_empty() {
            return Err(GenerateError::Input(format!("{} is empty (it tokenised to no ids)", name(i))));
        }
        if p.len() > cfg.max_position_embeddings {
            return Err(GenerateError::Input(format!(
                "{} has {} tokens, more than the model's max_position_embeddings ({})",
                name(i),
                p.len(),
                cfg.max_position_embeddings
            )));
        }
        if let Some(&bad) = p.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(GenerateError::Input(format!("{} has token id {bad} >= vocab_size {}", name(i), cfg.vocab_size)));
        }
    }
    Ok(())
}

/// Left-pad `prompts` (row r's real tokens at key indices `pad[r]..longest`, each row with its
/// own rotary positions from 0, padding keys masked) and run them through the model into a
/// cache with room for `extra` more positions.
///
/// Returns the last position's logits `[n, vocab]` (f32), the cache and the key-validity flags.
fn prefill<B: Backend>(model: &CausalLm<B>, head: &DecodeHead<B>, prompts: &[Vec<u32>], extra: usize) -> (Tensor<B, 2>, KvCache<B>, Vec<Vec<bool>>) {
    let device = model.device();
    let (n, longest) = (prompts.len(), prompts.iter().map(Vec::len).max().unwrap_or(1));
    let pad_id = 0i64;
    let mut ids = Vec::with_capacity(n * longest);
    let mut key_valid: Vec<Vec<bool>> = Vec::with_capacity(n);
    let mut positions: Vec<Vec<usize>> = Vec::with_capacity(n);
    for p in prompts {
        let pad = longest - p.len();
        ids.extend(std::iter::repeat(pad_id).take(pad).chain(p.iter().map(|&t| t as i64)));
        key_valid.push((0..longest).map(|j| j >= pad).collect());
        positions.push((0..longest).map(|j| j.saturating_sub(pad)).collect());
    }
    let mut cache = KvCache::new(&model.config, n, longest + extra, model.dtype(), &device);
    let pos = Positions::with_cache(&key_valid, &positions, 0);
    let hidden = model.forward_hidden(int_tensor(ids, [n, longest], &device), &pos, Some(&mut cache));
    let logits = model.decode_logits(head, hidden.narrow(1, longest - 1, 1)).reshape([n, model.config.vocab_size]);
    (logits, cache, key_valid)
}

/// Next-token log-probabilities of the given candidate ids after each prompt (raw model), as
/// classifier judges read a verdict: entry `[row][j]` is `log p(candidates[j] | prompts[row])`.
pub fn next_token_logprobs<B: Backend>(model: &CausalLm<B>, prompts: &[Vec<u32>], candidates: &[u32]) -> Result<Vec<Vec<f32>>> {
    validate_prompts(model, prompts)?;
    if prompts.is_empty() {
        return Ok(vec![]);
    }
    let (logits, _, _) = prefill(model, &model.decode_head(0, 0), prompts, 0);
    let n = prompts.len();
    let idx = int_tensor::<B, 2>(
        (0..n).flat_map(|_| candidates.iter().map(|&c| c as i64)).collect(),
        [n, candidates.len()],
        &model.device(),
    );
    let lp: Vec<f32> = log_softmax(logits, 1).gather(1, idx).into_data().convert::<f32>().to_vec().unwrap();
    check_finite(&lp, || "after the prompt".into())?;
    Ok(lp.chunks(candidates.len()).map(<[f32]>::to_vec).collect())
}

/// Teacher-forced log-probabilities of `response` after `prompt`: entry `i` is
/// `log p(response[i] | prompt, response[..i])` under the raw model.
pub fn score<B: Backend>(model: &CausalLm<B>, prompt: &[u32], response: &[u32]) -> Result<Vec<f32>> {
    if prompt.is_empty() {
        return Err(GenerateError::Input("the prompt is empty (it tokenised to no ids)".into()));
    }
    if response.is_empty() {
        return Ok(vec![]);
    }
    let ids: Vec<u32> = prompt.iter().chain(response).copied().collect();
    validate_sequences(model, std::slice::from_ref(&ids), |_| "prompt + response".into())?;
    let r = response.len();
    let logp = log_softmax(model.continuation_logits(&ids, prompt.len()), 1); // [r, vocab]
    let targets = int_tensor::<B, 2>(response.iter().map(|&i| i as i64).collect(), [r, 1], &model.device());
    let lp: Vec<f32> = logp.gather(1, targets).into_data().convert::<f32>().to_vec::<f32>().unwrap();
    check_finite(&lp, || "on the response".into())?;
    Ok(lp)
}
