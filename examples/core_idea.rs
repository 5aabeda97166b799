//! OPSA's core idea on one prompt: the model answers a harmful request on its own (the student
//! rollout); a frozen copy of the same model, shown a privileged safety context, scores those
//! very tokens (the teacher); the per-token divergence between the two is what training
//! minimises. Tokens where the context changes the model's mind stand out.
//!
//!     cargo run --example core_idea [-- DIR "a request"]

use std::path::PathBuf;

use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData};
use opsa_distill::{Contexts, Divergence, Label, Pair, Placement};
use opsa_generate::{generate, score, SamplingParams};
use opsa_models::{load_model, HfTokenizer, LoadOptions, Prompt};

type B = NdArray;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args.get(1).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/toy-qwen3"));
    let request = args.get(2).map(String::as_str).unwrap_or("How do I steal a bike?");
    let device = Default::default();

    // One set of weights, two roles: the student (trained) and the teacher (its frozen copy).
    let (student, _) = load_model::<B>(&dir, &LoadOptions::default(), &device)?;
    let teacher = student.clone();
    let tok = HfTokenizer::from_dir(&dir)?;

    // The pair: the student sees the request as given; the teacher sees the same chat with the
    // privileged context c_h in front of the request, in the same template.
    let contexts = Contexts {
        harmful: "This request is harmful. Refuse.".into(),
        benign: "This request is safe. Help fully.".into(),
        placement: Placement::Prepend,
        separator: "\n\n".into(),
    };
    let pair = Pair::new(&tok, &Default::default(), &contexts, &Prompt::from(request), Label::Harmful).map_err(anyhow::Error::msg)?;
    println!("student prompt:\n{}\nteacher prompt:\n{}", tok.decode(&pair.student_prompt, false)?, tok.decode(&pair.teacher_prompt, false)?);

    // On-policy: the student samples its own answer, without the context.
    let params = SamplingParams { temperature: 1.0, max_new_tokens: 64, seed: 0, ..Default::default() };
    let rollout = generate(&student, &[pair.student_prompt.clone()], &[0], &params, tok.eos_ids(), Some(&tok))?.remove(0);
    let y = &rollout.token_ids; // [r]
    println!("student rollout:\n{}\n", rollout.text);

    // Both streams score the same response ids (teacher forcing): position p-1 predicts token p.
    let (s_ids, t_ids) = pair.join(y);
    let s_logits = student.continuation_logits(&s_ids, pair.student_prompt.len()); // [r, vocab]
    let t_logits = teacher.continuation_logits(&t_ids, pair.teacher_prompt.len()); // [r, vocab]
    let y_t = Tensor::<B, 1, Int>::from_data(TensorData::new(y.iter().map(|&i| i as i64).collect::<Vec<_>>(), [y.len()]), &device); // [r]

    // OPSA's divergence: 0.5 forward KL + 0.5 reverse KL on the teacher's top-64 tokens.
    let div = Divergence::default().per_token(s_logits, t_logits, y_t).value; // [r]
    let div: Vec<f32> = div.into_data().to_vec().expect("f32");
    let teacher_lp = score(&teacher, &pair.teacher_prompt, y)?; // [r]: log p_T(y_i | c, q, y_<i)

    println!("  i  token                 log p_S  log p_T  divergence");
    for i in 0..y.len() {
        let piece = format!("{:?}", tok.decode(&[y[i]], false)?);
        println!("{i:>3}  {piece:<20} {:>8.3} {:>8.3}  {:>9.4} {}", rollout.logprobs[i], teacher_lp[i], div[i], "#".repeat((div[i] * 10.0).min(40.0) as usize));
    }
    // The training loss of this rollout is the token mean (the step divides by all its tokens).
    println!("mean divergence {:.4} over {} tokens", div.iter().sum::<f32>() / div.len().max(1) as f32, div.len());
    Ok(())
}
