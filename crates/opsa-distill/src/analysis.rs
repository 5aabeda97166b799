//! Per-token teacher–student divergence of given responses (no autodiff): the measurement
//! behind `opsa analyze-kl` and the trainer's held-out check.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use opsa_models::CausalLm;

use crate::context::Pair;
use crate::divergence::Divergence;

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
    let ls = student.continuation_logits(&s, pair.student_prompt.len());
    let lt = teacher.continuation_logits(&t, pair.teacher_prompt.len());
    let y = Tensor::<B, 1, Int>::from_data(TensorData::new(response.iter().map(|&x| x as i64).collect::<Vec<_>>(), [r]), &student.device());
    div.per_token(ls, lt, y).value.into_data().convert::<f32>().to_vec().expect("f32")
}
