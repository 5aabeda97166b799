//! The distillation loss and its gradients with memory bounded by a chunk of positions.
//!
//! With a real vocabulary (151,936 ids) a `[b, t, vocab]` f32 tensor is several GB, and autodiff
//! keeps a few of them per divergence. Chunking the *forward* over positions is not enough,
//! because the graph keeps every chunk's intermediates until `backward`. So the loss is split
//! at the final hidden states (the "detach trick"):
//!
//! 1. the student trunk runs once with autodiff, giving hidden states `h` `[b, t, hidden]`
//!    (a [`Trunk`]: with activation recompute it keeps only each layer's input);
//! 2. `h` is detached into a leaf `h'`; for each chunk of response positions, the student head,
//!    the teacher head and the divergence run on `h'[chunk]`, and that chunk's loss is
//!    back-propagated at once, giving `∂L/∂h'[chunk]` and the head's gradient; the chunk's
//!    `[chunk, vocab]` tensors are freed before the next chunk. A top-k divergence (OPSA's)
//!    differentiates the student's logits at the teacher's top-k ids only, computed from those
//!    k head rows ([`CausalLm::logits_at`]), so no `[chunk, vocab]` product is back-propagated;
//! 3. one more backward of `Σ h ⊙ sg(∂L/∂h')` through the trunk gives the trunk's gradients
//!    ([`CausalLm::backward_trunk`], one layer at a time with recompute).
//!
//! Peak memory of the divergence is then `O(chunk · vocab)`, independent of the sequence length,
//! and the gradients equal those of the unchunked loss ([`loss_unchunked`], tested).

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use opsa_models::{CausalLm, Trunk};

use crate::divergence::{cross_entropy, ppo_clip, token_mean, top_k_indices, Divergence, PerToken};

/// Which positions are distilled. Entry `i` describes one response token: the flat index
/// (`row * t + position`) of the student position that predicts it, the teacher position that
/// predicts it (the teacher's prompt is longer: it holds the context), and the token itself.
#[derive(Debug, Clone, Default)]
pub struct Targets {
    pub student_rows: Vec<usize>,
    pub teacher_rows: Vec<usize>,
    pub tokens: Vec<u32>,
}

impl Targets {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Add the targets of one response: position p−1 predicts token p, so response token `i`
    /// is predicted at `student_at + i − 1` and `teacher_at + i − 1`, where `*_at` is the flat
    /// index (`row * t + prompt length`) of the response's first token in each stream.
    pub fn push_response(&mut self, student_at: usize, teacher_at: usize, response: &[u32]) {
        for (i, &y) in response.iter().enumerate() {
            self.student_rows.push(student_at + i - 1);
            self.teacher_rows.push(teacher_at + i - 1);
            self.tokens.push(y);
        }
    }
}

/// What one micro-batch contributes.
pub struct DistillGrads {
    /// Gradients of this micro-batch's share of the step loss.
    pub grads: GradientsParams,
    /// This micro-batch's share of the step loss (sum of per-token losses / step tokens).
    pub loss: f64,
    /// Divergence at each target (same order as [`Targets`]).
    pub values: Vec<f32>,
    /// Student entropy (nats) at each target.
    pub entropy: Vec<f32>,
}

fn index<B: Backend>(ix: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    Tensor::from_data(TensorData::new(ix.iter().map(|&i| i as i64).collect::<Vec<_>>(), [ix.len()]), device)
}

fn host<B: Backend>(t: Tensor<B, 1>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().expect("f32 data")
}

/// Logits of selected positions.
///
/// # Shapes
/// - hidden: `[n_all, hidden]`, rows: `c` indices → `[c, vocab]` (f32)
fn head<B: Backend>(model: &CausalLm<B>, hidden: Tensor<B, 2>, rows: &[usize]) -> Tensor<B, 2> {
    head_with(model, None, hidden, rows)
}

/// Logits of hidden states already selected.
///
/// # Shapes
/// - hidden: `[c, hidden]` → `[c, vocab]` (f32)
fn row_logits<B: Backend>(model: &CausalLm<B>, hidden: Tensor<B, 2>) -> Tensor<B, 2> {
    let c = hidden.dims()[0];
    model.logits(hidden.unsqueeze::<3>()).reshape([c, model.config.vocab_size])
}

/// [`head`], with a tied head's weight given as `emb_t` `[hidden, vocab]` (see [`TiedLeaf`]).
fn head_with<B: Backend>(model: &CausalLm<B>, emb_t: Option<&Tensor<B, 2>>, hidden: Tensor<B, 2>, rows: &[usize]) -> Tensor<B, 2> {
    let h = hidden.select(0, index::<B>(rows, &model.device())); // [c, hidden]
    match emb_t {
        Some(w) => opsa_models::decoder::tied_logits(h.unsqueeze::<3>(), w.clone()).reshape([rows.len(), model.config.vocab_size]),
        None => row_logits(model, h),
    }
}

/// A tied head's weight as a leaf of its own, transposed: `[hidden, vocab]`.
///
/// Each chunk back-propagates separately, so the head's gradient is summed over chunks. Taken
/// through the embedding parameter, every chunk's gradient is the transposed view of a
/// `[hidden, vocab]` product, and summing such views runs a strided loop on CPU backends
/// (flex: ~10 % of the training pass). Through this leaf each chunk's gradient is the
/// contiguous `[hidden, vocab]` product itself; the sum is transposed back once per call.
struct TiedLeaf<B: AutodiffBackend> {
    emb_t: Tensor<B, 2>,
    grad: Option<Tensor<B::InnerBackend, 2>>,
}

impl<B: AutodiffBackend> TiedLeaf<B> {
    /// `None` for an untied or a frozen head (no gradient to take).
    fn new(model: &CausalLm<B>) -> Option<Self> {
        let w = &model.model.embed_tokens.weight;
        if model.lm_head.is_some() || !w.val().is_require_grad() {
            return None;
        }
        Some(TiedLeaf { emb_t: Tensor::from_inner(w.val().inner().transpose()).require_grad(), grad: None })
    }

    fn add(&mut self, grads: &B::Gradients) {
        if let Some(g) = self.emb_t.grad(grads) {
            self.grad = Some(match self.grad.take() {
                Some(sum) => sum + g,
                None => g,
            });
        }
    }

    /// The summed gradient under the embedding's parameter id, `[vocab, hidden]`, in row-major
    /// order: the optimiser's element-wise ops then read it like the weight they update (on
    /// the transposed view flex ran each of them as a strided gather, ~3 % of the pass).
    fn into_grads(self, model: &CausalLm<B>) -> GradientsParams {
        let mut out = GradientsParams::new();
        if let Some(g) = self.grad {
            let [hidden, vocab] = g.dims();
            // A reshape of a transposed view copies it into row-major order.
            let g = g.transpose().reshape([vocab * hidden]).reshape([vocab, hidden]);
            out.register::<B::InnerBackend, 2>(model.model.embed_tokens.weight.id, g);
        }
        out
    }
}

/// The entropy (nats) of each row's softmax, with one `exp` per entry: with `x` the logits
/// less the row maximum, `e = exp(x)` and `Z = Σ e`, `H = log Z − Σ e·x / Z`.
///
/// # Shapes
/// - logits: `[n, vocab]` → `[n]`
fn row_entropy<B: Backend>(logits: Tensor<B, 2>) -> Tensor<B, 1> {
    let n = logits.dims()[0];
    let x = logits.clone() - logits.max_dim(1); // [n, vocab]
    let e = x.clone().exp();
    let z = e.clone().sum_dim(1); // [n, 1]
    (z.clone().log() - (e * x).sum_dim(1) / z).reshape([n])
}

/// `[b, t, hidden]` → `[b * t, hidden]`: rows indexed as in [`Targets`].
fn flat<B: Backend>(h: Tensor<B, 3>) -> Tensor<B, 2> {
    let [b, t, d] = h.dims();
    h.reshape([b * t, d])
}

/// What is minimised at each target token. All three are token-mean reduced over the whole
/// optimiser step (see [`token_mean`]).
#[derive(Debug, Clone, Copy)]
pub enum Objective<'a> {
    /// A divergence between the teacher's and the student's next-token distributions (OPSA,
    /// logit distillation). Needs a teacher.
    Distill(&'a Divergence),
    /// Cross-entropy of the target token: `−log q(y_t)` (SFT). No teacher.
    CrossEntropy,
    /// PPO-clipped policy gradient on the sampled token (COPSD):
    /// `−min(ρ A, clip(ρ, 1−ε, 1+ε) A)` with `ρ = exp(log q(y_t) − log q_old(y_t))`.
    /// `advantages` and `old_logprobs` are given per target, in [`Targets`] order.
    Ppo { advantages: &'a [f32], old_logprobs: &'a [f32], clip: f64 },
}

/// The per-token loss at `targets[range]`, with the student's logits there (`[c, vocab]`, no
/// graph; for the entropy metric). `value` is the divergence (Distill), the NLL (CrossEntropy)
/// or the ratio ρ (Ppo).
///
/// A top-k divergence takes the student's logits at the teacher's top-k ids only
/// ([`CausalLm::logits_at`]), so the head's backward is `O(c · k · hidden)` instead of two
/// `[c, vocab]` products; `inner` (the student without autodiff) then gives the metric's logits.
#[allow(clippy::too_many_arguments)]
fn per_token_range<B: AutodiffBackend>(
    obj: &Objective,
    student: &CausalLm<B>,
    inner: Option<&CausalLm<B::InnerBackend>>,
    tied: Option<&Tensor<B, 2>>,
    hs: Tensor<B, 2>,
    teacher: Option<(&CausalLm<B::InnerBackend>, Tensor<B::InnerBackend, 2>)>,
    targets: &Targets,
    range: std::ops::Range<usize>,
) -> (PerToken<B>, Tensor<B::InnerBackend, 2>) {
    let device = student.device();
    let c = range.len();
    let rows = &targets.student_rows[range.clone()];
    let tokens: Vec<usize> = targets.tokens[range.clone()].iter().map(|&x| x as usize).collect();
    let tokens = index::<B>(&tokens, &device);
    if let (Objective::Distill(div), Some(inner)) = (obj, inner) {
        if let Some(k) = div.top_k_support(student.config.vocab_size) {
            let (t_model, ht) = teacher.expect("the distillation objective needs a teacher");
            let t_h = ht.select(0, index::<B::InnerBackend>(&targets.teacher_rows[range], &device)); // [c, hidden]
            let top = top_k_indices(row_logits(t_model, t_h.clone()), k); // [c, k]
            // The teacher's values at those ids are computed as the student's are (not taken
            // from its dense logits): a student equal to its teacher then gets exactly zero
            // gradient, as through the dense head, instead of rounding noise that Adam would
            // scale up to full steps.
            let t_top = Tensor::<B, 2>::from_inner(t_model.logits_at(t_h, top.clone()));
            let h = hs.select(0, index::<B>(rows, &device)); // [c, hidden]
            let s_logits = row_logits(inner, h.clone().inner()); // [c, vocab], no graph
            let s_top = student.logits_at(h, Tensor::from_inner(top)); // [c, k]
            return (div.per_token(s_top, t_top, tokens), s_logits);
        }
    }
    let s_logits = head_with(student, tied, hs, rows); // [c, vocab]
    let pt = match obj {
        Objective::Distill(div) => {
            let (t_model, ht) = teacher.expect("the distillation objective needs a teacher");
            let t_logits = Tensor::<B, 2>::from_inner(head(t_model, ht, &targets.teacher_rows[range]));
            div.per_token(s_logits.clone(), t_logits, tokens)
        }
        Objective::CrossEntropy => cross_entropy(s_logits.clone(), tokens),
        Objective::Ppo { advantages, old_logprobs, clip } => {
            let host_vec = |v: &[f32]| Tensor::<B, 1>::from_data(TensorData::new(v[range.clone()].to_vec(), [c]), (&device, burn::tensor::DType::F32));
            ppo_clip(s_logits.clone(), tokens, host_vec(old_logprobs), host_vec(advantages), *clip)
        }
    };
    (pt, s_logits.inner())
}

/// Chunked loss and gradients of a divergence (see the module docs).
///
/// # Shapes
/// - student_trunk: hidden `[b, t_s, hidden]`, from [`CausalLm::forward_trunk`]
/// - teacher_hidden: `[b_t, t_t, hidden]`, constant
#[allow(clippy::too_many_arguments)]
pub fn backward_chunked<B: AutodiffBackend>(
    div: &Divergence,
    student: &CausalLm<B>,
    student_trunk: Trunk<B>,
    teacher: &CausalLm<B::InnerBackend>,
    teacher_hidden: Tensor<B::InnerBackend, 3>,
    targets: &Targets,
    step_tokens: usize,
    chunk: usize,
) -> DistillGrads {
    backward_objective(&Objective::Distill(div), student, student_trunk, Some((teacher, teacher_hidden)), targets, step_tokens, chunk)
}

/// Chunked loss and gradients of any [`Objective`]; `teacher` is needed by `Distill` only.
pub fn backward_objective<B: AutodiffBackend>(
    obj: &Objective,
    student: &CausalLm<B>,
    student_trunk: Trunk<B>,
    teacher: Option<(&CausalLm<B::InnerBackend>, Tensor<B::InnerBackend, 3>)>,
    targets: &Targets,
    step_tokens: usize,
    chunk: usize,
) -> DistillGrads {
    let device = student.device();
    let [b, t, d] = student_trunk.hidden.dims();
    let hs = flat(student_trunk.hidden.clone());
    let teacher = teacher.map(|(m, h)| (m, flat(h)));
    // 2. A leaf cut at the hidden states: chunks back-propagate into it and into the head only.
    let mut grad_h: Tensor<B::InnerBackend, 2> = Tensor::zeros(hs.dims(), (&device, hs.dtype()));
    let leaf = hs.detach().require_grad();
    // A top-k divergence reads the student's head at k ids per position (see
    // [`per_token_range`]): no dense head product carries a gradient, so no tied leaf.
    let sparse = matches!(obj, Objective::Distill(div) if div.top_k_support(student.config.vocab_size).is_some());
    let inner = sparse.then(|| student.valid());
    let mut tied = if sparse { None } else { TiedLeaf::new(student) };
    let mut acc = GradientsAccumulator::<CausalLm<B>>::new();
    let (mut loss, mut values, mut entropy) = (0.0, Vec::with_capacity(targets.len()), Vec::with_capacity(targets.len()));
    let chunk = chunk.max(1);
    for start in (0..targets.len()).step_by(chunk) {
        let end = (start + chunk).min(targets.len());
        let t = teacher.as_ref().map(|(m, h)| (*m, h.clone()));
        let (pt, s_logits) = per_token_range(obj, student, inner.as_ref(), tied.as_ref().map(|l| &l.emb_t), leaf.clone(), t, targets, start..end);
        entropy.extend(host(row_entropy(s_logits))); // metrics only
        values.extend(host(pt.value.inner()));
        let l = token_mean(pt.loss, step_tokens);
        loss += l.clone().inner().into_data().convert::<f64>().to_vec::<f64>().expect("f64")[0];
        let mut grads = l.backward();
        if let Some(g) = leaf.grad(&grads) {
            grad_h = grad_h + g;
        }
        if let Some(tied) = tied.as_mut() {
            tied.add(&grads);
        }
        acc.accumulate(student, GradientsParams::from_module(&mut grads, student));
    }
    if let Some(tied) = tied {
        acc.accumulate(student, tied.into_grads(student));
    }
    // 3. The trunk: d/dθ Σ h ⊙ sg(∂L/∂h) = (∂L/∂h) · ∂h/∂θ.
    drop(leaf);
    acc.accumulate(student, student.backward_trunk(student_trunk, grad_h.reshape([b, t, d])));
    DistillGrads { grads: acc.grads(), loss, values, entropy }
}

/// Log-probability of each target token under `model`, and the model's entropy there, without
/// autodiff, `chunk` positions at a time (COPSD's teacher and old-policy scores).
///
/// # Shapes
/// - hidden: `[b, t, hidden]`; `rows[i]` indexes `b * t` → two vectors of `rows.len()`
pub fn token_logprobs<B: Backend>(model: &CausalLm<B>, hidden: Tensor<B, 3>, rows: &[usize], tokens: &[u32], chunk: usize) -> (Vec<f32>, Vec<f32>) {
    let device = model.device();
    let h = flat(hidden);
    let (mut lp, mut ent) = (Vec::with_capacity(rows.len()), Vec::with_capacity(rows.len()));
    for start in (0..rows.len()).step_by(chunk.max(1)) {
        let end = (start + chunk.max(1)).min(rows.len());
        let c = end - start;
        let l = log_softmax(head(model, h.clone(), &rows[start..end]), 1); // [c, vocab]
        let y: Vec<usize> = tokens[start..end].iter().map(|&x| x as usize).collect();
        lp.extend(host(l.clone().gather(1, index::<B>(&y, &device).reshape([c, 1])).reshape([c])));
        ent.extend(host((l.clone().exp() * l).sum_dim(1).neg().reshape([c])));
    }
    (lp, ent)
}

/// The same loss built in one piece (all targets' logits at once): the reference that
/// [`backward_chunked`] is tested against, and fine for small vocabularies.
pub fn loss_unchunked<B: AutodiffBackend>(
    div: &Divergence,
    student: &CausalLm<B>,
    student_hidden: Tensor<B, 3>,
    teacher: &CausalLm<B::InnerBackend>,
    teacher_hidden: Tensor<B::InnerBackend, 3>,
    targets: &Targets,
    step_tokens: usize,
) -> Tensor<B, 1> {
    // The dense head throughout, also for a top-k divergence: the reference for
    // [`CausalLm::logits_at`] too.
    let obj = Objective::Distill(div);
    let (pt, _) = per_token_range(&obj, student, None, None, flat(student_hidden), Some((teacher, flat(teacher_hidden))), targets, 0..targets.len());
    token_mean(pt.loss, step_tokens)
}
