//! Per-token divergences between the teacher's and the student's next-token distributions.
//!
//! Small pure functions over logits of the positions that count (`[n, vocab]`, padding and
//! prompt positions already removed), so masking is explicit at the call site and the
//! normalisation is a separate, visible step ([`token_mean`]).
//!
//! Conventions, with P the teacher and Q the student at one position:
//! - both logits are divided by `temperature` first;
//! - `top_k`: the teacher's `k` largest logits pick the support; teacher and student logits are
//!   gathered there and **both** renormalised over those `k` entries (OPSA: k = 64);
//! - forward KL = Σ P (log P − log Q) (mode-covering), reverse KL = Σ Q (log Q − log P)
//!   (mode-seeking);
//! - generalised JSD(β), as TRL's GKD: M = βP + (1−β)Q, JSD = β KL(P‖M) + (1−β) KL(Q‖M);
//!   **β = 0 is forward KL and β = 1 reverse KL exactly** (the limits of the β-scaled form,
//!   special-cased, since the formula itself is 0 at both ends);
//! - mixed(α) = α forward + (1−α) reverse (OPSA's default: α = 0.5 on top-64);
//! - pointwise clip τ: each vocabulary entry's term is `min(term, τ)` before the sum, so a few
//!   pivot tokens cannot dominate the gradient;
//! - sampled-token: the value is log Q(y) − log P(y) at the sampled token only; the loss is the
//!   policy-gradient surrogate −sg(clip(log P(y) − log Q(y), lo, hi)) · log Q(y), whose gradient
//!   is the (clipped) single-sample reverse-KL gradient.
//!
//! Everything is computed in f32 (the caller passes f32 logits).

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use serde::{Deserialize, Serialize};

/// Which divergence, with its parameter.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DivergenceKind {
    /// KL(teacher ‖ student).
    Forward,
    /// KL(student ‖ teacher).
    Reverse,
    /// Generalised JSD(β); β = 0 forward, β = 1 reverse.
    Jsd { beta: f64 },
    /// α · forward + (1 − α) · reverse.
    Mixed { alpha: f64 },
    /// Sampled-token log-ratio with the reward clipped to [lo, hi].
    Sampled { lo: f64, hi: f64 },
}

/// A divergence and its options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Divergence {
    #[serde(flatten)]
    pub kind: DivergenceKind,
    /// Restrict to the teacher's top-k tokens, renormalised (None = full vocabulary).
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default = "one")]
    pub temperature: f64,
    /// Pointwise clip τ on each vocabulary entry's term.
    #[serde(default)]
    pub clip: Option<f64>,
}

fn one() -> f64 {
    1.0
}

impl Default for Divergence {
    /// OPSA's divergence: mixed α = 0.5 on the teacher's top-64 tokens.
    fn default() -> Self {
        Divergence { kind: DivergenceKind::Mixed { alpha: 0.5 }, top_k: Some(64), temperature: 1.0, clip: None }
    }
}

/// Per-token results.
///
/// # Shapes
/// - `value`: `[n]` the divergence at each position (for metrics; no gradient needed)
/// - `loss`: `[n]` what to differentiate (equal to `value` except for the sampled-token form)
pub struct PerToken<B: Backend> {
    pub value: Tensor<B, 1>,
    pub loss: Tensor<B, 1>,
}

impl Divergence {
    pub fn validate(&self) -> Result<(), String> {
        match self.kind {
            DivergenceKind::Jsd { beta } if !(0.0..=1.0).contains(&beta) => return Err(format!("jsd beta {beta} must lie in [0, 1]")),
            DivergenceKind::Mixed { alpha } if !(0.0..=1.0).contains(&alpha) => {
                return Err(format!("mixed alpha {alpha} must lie in [0, 1]"))
            }
            DivergenceKind::Sampled { lo, hi } if !(lo < hi) => return Err(format!("sampled clip range [{lo}, {hi}] is empty")),
            _ => {}
        }
        if !(self.temperature > 0.0) {
            return Err(format!("temperature {} must be positive", self.temperature));
        }
        if self.top_k == Some(0) {
            return Err("top_k must be at least 1 (or absent for the full vocabulary)".into());
        }
        if matches!(self.clip, Some(c) if !(c > 0.0)) {
            return Err("clip must be positive".into());
        }
        Ok(())
    }

    /// `Some(k)` when the divergence is computed on the teacher's top-k ids of a `vocab`-wide
    /// distribution (the sampled-token form ignores `top_k`; `k ≥ vocab` is the whole
    /// vocabulary). Logits already restricted to those k ids (`[n, k]`) pass through
    /// [`Divergence::per_token`] unchanged, since `k < k` fails.
    pub fn top_k_support(&self, vocab: usize) -> Option<usize> {
        match (self.kind, self.top_k) {
            (DivergenceKind::Sampled { .. }, _) => None,
            (_, Some(k)) if k < vocab => Some(k),
            _ => None,
        }
    }

    /// # Shapes
    /// - student: `[n, vocab]` (f32, carries the gradient)
    /// - teacher: `[n, vocab]` (f32, constant)
    /// - sampled: `[n]` the response token at each position (used by the sampled-token form)
    pub fn per_token<B: Backend>(&self, student: Tensor<B, 2>, teacher: Tensor<B, 2>, sampled: Tensor<B, 1, Int>) -> PerToken<B> {
        let teacher = teacher.detach();
        let (s, t) = if self.temperature != 1.0 {
            (student.div_scalar(self.temperature), teacher.div_scalar(self.temperature))
        } else {
            (student, teacher)
        };
        let n = s.dims()[0];
        if let DivergenceKind::Sampled { lo, hi } = self.kind {
            let y = sampled.reshape([n, 1]);
            let lq = log_softmax(s, 1).gather(1, y.clone()).reshape([n]);
            let lp = log_softmax(t, 1).gather(1, y).reshape([n]);
            let value = (lq.clone() - lp.clone()).detach();
            let reward = (lp - lq.clone()).detach().clamp(lo, hi);
            return PerToken { value, loss: reward.neg() * lq };
        }
        let (s, t) = match self.top_k_support(s.dims()[1]) {
            Some(k) => {
                let idx = top_k_indices(t.clone(), k);
                (s.gather(1, idx.clone()), t.gather(1, idx))
            }
            _ => (s, t),
        };
        let ls = log_softmax(s, 1);
        let lt = log_softmax(t, 1);
        let clip = self.clip;
        let value = match self.kind {
            DivergenceKind::Forward | DivergenceKind::Jsd { beta: 0.0 } => kl(lt, ls, clip),
            DivergenceKind::Reverse | DivergenceKind::Jsd { beta: 1.0 } => kl(ls, lt, clip),
            DivergenceKind::Jsd { beta } => {
                let lm = log_mix(lt.clone(), beta, ls.clone());
                kl(lt, lm.clone(), clip).mul_scalar(beta) + kl(ls, lm, clip).mul_scalar(1.0 - beta)
            }
            DivergenceKind::Mixed { alpha } => {
                kl(lt.clone(), ls.clone(), clip).mul_scalar(alpha) + kl(ls, lt, clip).mul_scalar(1.0 - alpha)
            }
            DivergenceKind::Sampled { .. } => unreachable!("handled above"),
        };
        PerToken { value: value.clone(), loss: value }
    }
}

/// Column indices of each row's `k` largest entries, largest first: the indices of
/// `topk_with_indices(k, 1)` without sorting whole rows.
///
/// The row is cut into blocks of `≈ √(v / k)` columns. Each of the row's k largest entries lies
/// in one of the k blocks with the largest maxima (a block outside them is beaten by k block
/// maxima at least as large as any of its entries), so only the block maxima and those k blocks
/// are sorted: for OPSA's k = 64 over 32,768 ids (blocks of 16), 2,048 block maxima and 1,024
/// candidates per row instead of 32,768 entries (the full sort was a tenth of a training pass on
/// flex). Exactly equal values may come out in another order than a full sort gives.
///
/// # Shapes
/// - logits: `[n, v]` → `[n, min(k, v)]`
pub fn top_k_indices<B: Backend>(logits: Tensor<B, 2>, k: usize) -> Tensor<B, 2, Int> {
    let [n, v] = logits.dims();
    let k = k.min(v);
    let best = ((v as f64 / k.max(1) as f64).sqrt().ceil() as usize).max(1);
    // A block width that divides v spares padding the logits (a copy of the whole `[n, v]`
    // tensor): the divisor of v nearest the best width, within half to twice it (at most 1.25×
    // as many entries to sort), if there is one: 16 for 32,768 ids, 64 for Qwen2.5's 151,936,
    // 48 for Llama 3's 128,256.
    let block = (best.div_ceil(2)..=2 * best).filter(|b| v % b == 0).min_by_key(|b| b.abs_diff(best)).unwrap_or(best);
    let nb = v.div_ceil(block);
    if nb <= k || block == 1 {
        return logits.topk_with_indices(k, 1).1; // nothing to save
    }
    let device = logits.device();
    // Pad the last block with −∞ (never chosen over a real entry above −∞).
    let padded = if nb * block > v {
        let pad = Tensor::<B, 2>::full([n, nb * block - v], f32::NEG_INFINITY, (&device, logits.dtype()));
        Tensor::cat(vec![logits, pad], 1)
    } else {
        logits
    };
    let blocks = padded.reshape([n, nb, block]); // [n, nb, block]
    let (_, top_blocks) = blocks.clone().max_dim(2).reshape([n, nb]).topk_with_indices(k, 1); // [n, k]
    let top_blocks = top_blocks.reshape([n, k, 1]).expand([n, k, block]);
    let candidates = blocks.gather(1, top_blocks.clone()).reshape([n, k * block]); // [n, k · block]
    let within = Tensor::<B, 1, Int>::arange(0..block as i64, &device).reshape([1, 1, block]).expand([n, k, block]);
    let columns = (top_blocks.mul_scalar(block as i64) + within).reshape([n, k * block]);
    let (_, pick) = candidates.topk_with_indices(k, 1); // [n, k]
    // A row with fewer than k entries above −∞ may pick padding: any −∞ column is as good.
    columns.gather(1, pick).clamp_max(v as i64 - 1)
}

/// KL(a ‖ b) per row from log-probabilities, each entry's term clipped above at `clip`.
///
/// # Shapes
/// - lp_a, lp_b: `[n, k]` → `[n]`
fn kl<B: Backend>(lp_a: Tensor<B, 2>, lp_b: Tensor<B, 2>, clip: Option<f64>) -> Tensor<B, 1> {
    let n = lp_a.dims()[0];
    let term = lp_a.clone().exp() * (lp_a - lp_b);
    let term = match clip {
        Some(c) => term.clamp_max(c),
        None => term,
    };
    term.sum_dim(1).reshape([n])
}

/// log(β·exp(a) + (1−β)·exp(b)), stably (a log-sum-exp with a detached max).
fn log_mix<B: Backend>(a: Tensor<B, 2>, beta: f64, b: Tensor<B, 2>) -> Tensor<B, 2> {
    let a = a.add_scalar(beta.ln());
    let b = b.add_scalar((1.0 - beta).ln());
    let m = a.clone().max_pair(b.clone()).detach();
    m.clone() + ((a - m.clone()).exp() + (b - m).exp()).log()
}

/// Token-mean reduction over the whole optimiser step: the sum of this micro-batch's per-token
/// losses divided by the number of valid tokens in *all* micro-batches of the step, so that
/// gradient accumulation does not change the objective.
pub fn token_mean<B: Backend>(loss: Tensor<B, 1>, step_tokens: usize) -> Tensor<B, 1> {
    loss.sum().div_scalar(step_tokens.max(1) as f64)
}

/// Cross-entropy of the target tokens (SFT): value and loss `−log q(y)`.
///
/// # Shapes
/// - student: `[n, vocab]` logits (f32, carries the gradient); tokens: `[n]` → `[n]`
pub fn cross_entropy<B: Backend>(student: Tensor<B, 2>, tokens: Tensor<B, 1, Int>) -> PerToken<B> {
    let n = student.dims()[0];
    let lq = log_softmax(student, 1).gather(1, tokens.reshape([n, 1])).reshape([n]);
    PerToken { value: lq.clone().neg().detach(), loss: lq.neg() }
}

/// PPO-clipped policy gradient on the sampled tokens (COPSD): with
/// `ρ = exp(log q(y) − log q_old(y))`, loss `−min(ρ A, clip(ρ, 1−ε, 1+ε) A)`; value `ρ`.
///
/// # Shapes
/// - student: `[n, vocab]` logits; tokens, old_logprobs, advantages: `[n]` → `[n]`
pub fn ppo_clip<B: Backend>(student: Tensor<B, 2>, tokens: Tensor<B, 1, Int>, old_logprobs: Tensor<B, 1>, advantages: Tensor<B, 1>, clip: f64) -> PerToken<B> {
    let n = student.dims()[0];
    let lq = log_softmax(student, 1).gather(1, tokens.reshape([n, 1])).reshape([n]);
    let ratio = (lq - old_logprobs.detach()).exp();
    let a = advantages.detach();
    let unclipped = ratio.clone() * a.clone();
    let clipped = ratio.clone().clamp(1.0 - clip, 1.0 + clip) * a;
    PerToken { value: ratio.detach(), loss: unclipped.min_pair(clipped).neg() }
}
