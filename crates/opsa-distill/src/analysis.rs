//! Per-token teacher–student divergence of given responses (no autodiff): the measurement
//! behind `opsa analyze-kl` and the trainer's held-out check.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use opsa_models::decoder::Positions;
use opsa_models::CausalLm;

use crate::context::Pair;
use crate::divergence::Divergence;

/// Logits `[r, vocab]` of the `r` positions that predict the response after a prompt of
/// `prompt_len` tokens.
fn response_logits<B: Backend>(m: &CausalLm<B>, ids: &[u32], prompt_len: usize, r: usize) -> Tensor<B, 2> {
    let device = m.device();
    let t = ids.len();
    let x = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), [1, t]), &device);
    let h = m.forward_hidden(x, &Positions::causal(1, t), None).narrow(1, prompt_len - 1, r);
    m.logits(h).reshape([r, m.config.vocab_size])
}

/// The divergence at every token of `response`: the teacher sees the pair's context prompt,
/// the student the plain prompt, both followed by the same response ids.
pub fn response_divergence<B: Backend>(
    div: &Divergence,
    student: &CausalLm<B>,
    teacher: &CausalLm<B>,
    pair: &Pair,
    response: &[u32],
) -> Vec<f32> {
    let r = response.len();
    if r == 0 {
        return vec![];
    }
    let (s, t) = pair.join(response);
    let ls = response_logits(student, &s, pair.student_prompt.len(), r);
    let lt = response_logits(teacher, &t, pair.teacher_prompt.len(), r);
    let y = Tensor::<B, 1, Int>::from_data(TensorData::new(response.iter().map(|&x| x as i64).collect::<Vec<_>>(), [r]), &student.device());
    div.per_token(ls, lt, y).value.into_data().convert::<f32>().to_vec().expect("f32")
}
