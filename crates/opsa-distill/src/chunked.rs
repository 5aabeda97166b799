//! The distillation loss and its gradients with memory bounded by a chunk of positions.
//!
//! With a real vocabulary (151,936 ids) a `[b, t, vocab]` f32 tensor is several GB, and autodiff
//! keeps a few of them per divergence. Chunking the *forward* over positions is not enough,
//! because the graph keeps every chunk's intermediates until `backward`. So the loss is split
//! at the final hidden states (the "detach trick"):
//!
//! 1. the student trunk runs once with autodiff, giving hidden states `h` `[b, t, hidden]`;
//! 2. `h` is detached into a leaf `h'`; for each chunk of response positions, the student head,
//!    the teacher head and the divergence run on `h'[chunk]`, and that chunk's loss is
//!    back-propagated at once, giving `∂L/∂h'[chunk]` and the head's gradient; the chunk's
//!    `[chunk, vocab]` tensors are freed before the next chunk;
//! 3. one more backward of `Σ h ⊙ sg(∂L/∂h')` through the trunk gives the trunk's gradients.
//!
//! Peak memory of the divergence is then `O(chunk · vocab)`, independent of the sequence length,
//! and the gradients equal those of the unchunked loss ([`loss_unchunked`], tested).

use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use opsa_models::CausalLm;

use crate::divergence::{token_mean, Divergence, PerToken};

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
    let h = hidden.select(0, index::<B>(rows, &model.device()));
    let c = rows.len();
    model.logits(h.unsqueeze::<3>()).reshape([c, model.config.vocab_size])
}

/// `[b, t, hidden]` → `[b * t, hidden]`: rows indexed as in [`Targets`].
fn flat<B: Backend>(h: Tensor<B, 3>) -> Tensor<B, 2> {
    let [b, t, d] = h.dims();
    h.reshape([b * t, d])
}

/// The divergence at `targets[range]`, with the student logits it was computed from.
fn per_token_range<B: AutodiffBackend>(
    div: &Divergence,
    student: &CausalLm<B>,
    hs: Tensor<B, 2>,
    teacher: &CausalLm<B::InnerBackend>,
    ht: Tensor<B::InnerBackend, 2>,
    targets: &Targets,
    range: std::ops::Range<usize>,
) -> (PerToken<B>, Tensor<B, 2>) {
    let s_logits = head(student, hs, &targets.student_rows[range.clone()]); // [c, vocab]
    let t_logits = Tensor::<B, 2>::from_inner(head(teacher, ht, &targets.teacher_rows[range.clone()]));
    let tokens: Vec<usize> = targets.tokens[range].iter().map(|&x| x as usize).collect();
    let pt = div.per_token(s_logits.clone(), t_logits, index::<B>(&tokens, &student.device()));
    (pt, s_logits)
}

/// Chunked loss and gradients (see the module docs).
///
/// # Shapes
/// - student_hidden: `[b, t_s, hidden]`, with the autodiff graph of the student trunk
/// - teacher_hidden: `[b_t, t_t, hidden]`, constant
pub fn backward_chunked<B: AutodiffBackend>(
    div: &Divergence,
    student: &CausalLm<B>,
    student_hidden: Tensor<B, 3>,
    teacher: &CausalLm<B::InnerBackend>,
    teacher_hidden: Tensor<B::InnerBackend, 3>,
    targets: &Targets,
    step_tokens: usize,
    chunk: usize,
) -> DistillGrads {
    let device = student.device();
    let hs = flat(student_hidden);
    let ht = flat(teacher_hidden);
    // 2. A leaf cut at the hidden states: chunks back-propagate into it and into the head only.
    let leaf = hs.clone().detach().require_grad();
    let mut acc = GradientsAccumulator::<CausalLm<B>>::new();
    let mut grad_h: Tensor<B::InnerBackend, 2> = Tensor::zeros(hs.dims(), (&device, hs.dtype()));
    let (mut loss, mut values, mut entropy) = (0.0, Vec::with_capacity(targets.len()), Vec::with_capacity(targets.len()));
    let chunk = chunk.max(1);
    for start in (0..targets.len()).step_by(chunk) {
        let end = (start + chunk).min(targets.len());
        let (pt, s_logits) = per_token_range(div, student, leaf.clone(), teacher, ht.clone(), targets, start..end);
        // Student entropy at these positions (metrics only).
        let lq = log_softmax(s_logits.inner(), 1);
        let ent = (lq.clone().exp() * lq).sum_dim(1).neg().reshape([end - start]);
        entropy.extend(host(ent));
        values.extend(host(pt.value.inner()));
        let l = token_mean(pt.loss, step_tokens);
        loss += l.clone().inner().into_data().convert::<f64>().to_vec::<f64>().expect("f64")[0];
        let mut grads = l.backward();
        if let Some(g) = leaf.grad(&grads) {
            grad_h = grad_h + g;
        }
        acc.accumulate(student, GradientsParams::from_module(&mut grads, student));
    }
    // 3. The trunk: d/dθ Σ h ⊙ sg(∂L/∂h) = (∂L/∂h) · ∂h/∂θ.
    let surrogate = (hs * Tensor::<B, 2>::from_inner(grad_h)).sum();
    let grads = surrogate.backward();
    acc.accumulate(student, GradientsParams::from_grads(grads, student));
    DistillGrads { grads: acc.grads(), loss, values, entropy }
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
    let (pt, _) = per_token_range(div, student, flat(student_hidden), teacher, flat(teacher_hidden), targets, 0..targets.len());
    token_mean(pt.loss, step_tokens)
}
