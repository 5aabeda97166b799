//! The divergence module against a PyTorch reference, its mathematical properties, and the
//! chunked (memory-bounded) gradients against the one-piece loss.

use burn::backend::{Autodiff, NdArray};
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Element, Int, Tensor, TensorData};
use opsa_distill::{backward_chunked, loss_unchunked, token_mean, Divergence, DivergenceKind, Targets};
use opsa_models::decoder::Positions;
use opsa_models::{load_model, LoadOptions};
use serde_json::Value;

use crate::common::*;

// Only f32: burn keeps default dtypes per device *type*, which NdArray<f32> and NdArray<f64>
// share, so an f64 backend in the same test process could change what f32 tests create.
type F32 = Autodiff<NdArray>;

fn fixture_json() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("distill/reference.json")).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn divergence_of(case: &Value) -> Divergence {
    let kind = match case["kind"].as_str().unwrap() {
        "forward" => DivergenceKind::Forward,
        "reverse" => DivergenceKind::Reverse,
        "jsd" => DivergenceKind::Jsd { beta: case["beta"].as_f64().unwrap() },
        "mixed" => DivergenceKind::Mixed { alpha: case["alpha"].as_f64().unwrap() },
        "sampled" => {
            let r = case.get("reward_clip").map(floats).unwrap_or(vec![-3.0, 5.0]);
            DivergenceKind::Sampled { lo: r[0], hi: r[1] }
        }
        k => panic!("unknown kind {k}"),
    };
    Divergence {
        kind,
        top_k: case.get("top_k").and_then(Value::as_u64).map(|k| k as usize),
        temperature: case.get("temperature").and_then(Value::as_f64).unwrap_or(1.0),
        clip: case.get("clip").and_then(Value::as_f64),
    }
}

/// (values [n], loss, grad [n, V]) of `div` on all positions, token mean over the masked ones.
fn evaluate<B: AutodiffBackend>(div: &Divergence, s: &[f64], t: &[f64], y: &[i64], mask: &[f64], n: usize, v: usize) -> (Vec<f64>, f64, Vec<f64>) {
    // Explicit dtypes: burn keeps default dtypes per device, shared by NdArray<f32> and NdArray<f64>.
    let dev = Default::default();
    let f = (&dev, <B::FloatElem as Element>::dtype());
    let student = Tensor::<B, 2>::from_data(TensorData::new(s.to_vec(), [n, v]), f).require_grad();
    let teacher = Tensor::<B, 2>::from_data(TensorData::new(t.to_vec(), [n, v]), f);
    let sampled = Tensor::<B, 1, Int>::from_data(TensorData::new(y.to_vec(), [n]), &dev);
    let pt = div.per_token(student.clone(), teacher, sampled);
    let m = Tensor::<B, 1>::from_data(TensorData::new(mask.to_vec(), [n]), f);
    let valid = mask.iter().filter(|&&x| x > 0.0).count();
    let loss = token_mean(pt.loss * m.clone(), valid);
    let grads = loss.backward();
    let g = student.grad(&grads).unwrap().into_data().convert::<f64>().to_vec().unwrap();
    let values = (pt.value * m).into_data().convert::<f64>().to_vec().unwrap();
    (values, loss.into_data().convert::<f64>().to_vec::<f64>().unwrap()[0], g)
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

fn check_against_pytorch<B: AutodiffBackend>(tol: f64) {
    let f = fixture_json();
    let shape: Vec<usize> = f["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
    let (n, v) = (shape[0] * shape[1], shape[2]);
    let (s, t, mask) = (floats(&f["student"]), floats(&f["teacher"]), floats(&f["mask"]));
    let y: Vec<i64> = f["sampled"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
    for case in f["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (values, loss, grad) = evaluate::<B>(&divergence_of(case), &s, &t, &y, &mask, n, v);
        let dv = max_diff(&values, &floats(&case["values"]));
        let dl = (loss - case["loss"].as_f64().unwrap()).abs();
        let dg = max_diff(&grad, &floats(&case["grad"]));
        assert!(dv < tol && dl < tol && dg < tol, "{name}: |Δvalue| {dv:.2e}, |Δloss| {dl:.2e}, |Δgrad| {dg:.2e} (tol {tol})");
    }
}

#[test]
fn divergences_match_pytorch_f32() {
    check_against_pytorch::<F32>(1e-5);
}

/// SFT's cross-entropy and COPSD's PPO-clipped objective against the same PyTorch reference.
#[test]
fn sft_and_ppo_objectives_match_pytorch() {
    let f = fixture_json();
    let shape: Vec<usize> = f["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
    let (n, v) = (shape[0] * shape[1], shape[2]);
    let dev = Default::default();
    let fl = (&dev, burn::tensor::DType::F32);
    let mask = floats(&f["mask"]);
    let y: Vec<i64> = f["sampled"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
    let vec1 = |key: &str| Tensor::<F32, 1>::from_data(TensorData::new(floats(&f[key]).iter().map(|&x| x as f32).collect(), [n]), fl);
    for case in f["objectives"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let s: Vec<f32> = floats(&f["student"]).iter().map(|&x| x as f32).collect();
        let student = Tensor::<F32, 2>::from_data(TensorData::new(s, [n, v]), fl).require_grad();
        let tokens = Tensor::<F32, 1, Int>::from_data(TensorData::new(y.clone(), [n]), &dev);
        let pt = match case["kind"].as_str().unwrap() {
            "cross_entropy" => opsa_distill::cross_entropy(student.clone(), tokens),
            "ppo" => opsa_distill::ppo_clip(student.clone(), tokens, vec1("old_logprobs"), vec1("advantages"), case["clip"].as_f64().unwrap()),
            k => panic!("unknown objective {k}"),
        };
        let m = Tensor::<F32, 1>::from_data(TensorData::new(mask.iter().map(|&x| x as f32).collect(), [n]), fl);
        let valid = mask.iter().filter(|&&x| x > 0.0).count();
        let loss = token_mean(pt.loss * m.clone(), valid);
        let grads = loss.backward();
        let g: Vec<f64> = student.grad(&grads).unwrap().into_data().convert::<f64>().to_vec().unwrap();
        let values: Vec<f64> = (pt.value * m).into_data().convert::<f64>().to_vec().unwrap();
        let l = loss.into_data().convert::<f64>().to_vec::<f64>().unwrap()[0];
        let dv = max_diff(&values, &floats(&case["values"]));
        let dl = (l - case["loss"].as_f64().unwrap()).abs();
        let dg = max_diff(&g, &floats(&case["grad"]));
        assert!(dv < 1e-5 && dl < 1e-5 && dg < 1e-5, "{name}: |Δvalue| {dv:.2e}, |Δloss| {dl:.2e}, |Δgrad| {dg:.2e}");
    }
}

fn all_kinds() -> Vec<Divergence> {
    let mut v = Vec::new();
    for kind in [
        DivergenceKind::Forward,
        DivergenceKind::Reverse,
        DivergenceKind::Jsd { beta: 0.0 },
        DivergenceKind::Jsd { beta: 0.3 },
        DivergenceKind::Jsd { beta: 1.0 },
        DivergenceKind::Mixed { alpha: 0.5 },
    ] {
        for top_k in [None, Some(5)] {
            for temperature in [1.0, 0.7] {
                v.push(Divergence { kind, top_k, temperature, clip: None });
            }
        }
    }
    v
}

fn random(n: usize, seed: u64, scale: f64) -> Vec<f64> {
    let mut s = opsa_generate::SplitMix64(seed);
    (0..n).map(|_| scale * (s.uniform() as f64 * 2.0 - 1.0)).collect()
}

#[test]
fn blockwise_top_k_picks_what_a_full_sort_picks() {
    type B = NdArray;
    let device = Default::default();
    // Vocabularies that split into whole blocks and ones that leave a padded last block; k from
    // 1 to more than the vocabulary; the largest entries bunched in one block, and spread.
    for (n, v, k) in [(4, 32768, 64), (3, 1000, 64), (5, 997, 7), (2, 50, 5), (3, 40, 1), (2, 9, 20)] {
        let mut x = random(n * v, (v * 31 + k) as u64, 10.0);
        for j in 0..k.min(v) {
            x[v / 3 + j] = 20.0 + j as f64; // row 0: its top entries all in a run of k columns
        }
        let logits = Tensor::<B, 2>::from_data(TensorData::new(x.iter().map(|&f| f as f32).collect::<Vec<_>>(), [n, v]), &device);
        let want: Vec<i64> = logits.clone().topk_with_indices(k.min(v), 1).1.into_data().convert::<i64>().to_vec().unwrap();
        let got: Vec<i64> = opsa_distill::top_k_indices(logits, k).into_data().convert::<i64>().to_vec().unwrap();
        assert_eq!(got, want, "n {n}, v {v}, k {k}");
    }
    // Rows with fewer than k entries above −∞ still give in-range columns, the finite ones first.
    let mut x = vec![f32::NEG_INFINITY; 2 * 100];
    x[7] = 1.0;
    x[100 + 42] = 2.0;
    let got: Vec<i64> = opsa_distill::top_k_indices(Tensor::<B, 2>::from_data(TensorData::new(x, [2, 100]), &device), 8).into_data().convert::<i64>().to_vec().unwrap();
    assert_eq!((got[0], got[8]), (7, 42));
    assert!(got.iter().all(|&c| (0..100).contains(&c)), "{got:?}");
}

#[test]
fn divergence_of_a_distribution_with_itself_is_zero_and_otherwise_positive() {
    let (n, v) = (6, 17);
    let s = random(n * v, 1, 4.0);
    let t = random(n * v, 2, 4.0);
    let y: Vec<i64> = (0..n as i64).collect();
    let mask = vec![1.0; n];
    for div in all_kinds().into_iter().chain([Divergence { kind: DivergenceKind::Sampled { lo: -3.0, hi: 5.0 }, ..Default::default() }]) {
        let (same, _, grad) = evaluate::<F32>(&div, &s, &s, &y, &mask, n, v);
        assert!(same.iter().all(|x| x.abs() < 1e-6), "{div:?}: D(p, p) = {same:?}");
        if !matches!(div.kind, DivergenceKind::Sampled { .. }) {
            assert!(grad.iter().all(|g| g.abs() < 1e-6), "{div:?}: gradient at p = q is not zero");
            let (diff, _, _) = evaluate::<F32>(&div, &s, &t, &y, &mask, n, v);
            assert!(diff.iter().all(|&x| x > 0.0), "{div:?}: D(p, q) = {diff:?} should be positive");
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    let (n, v) = (3, 7);
    let s = random(n * v, 3, 2.0);
    let t = random(n * v, 4, 2.0);
    let y = vec![0, 3, 6];
    let mask = vec![1.0, 0.0, 1.0];
    for div in all_kinds() {
        let (_, _, grad) = evaluate::<F32>(&div, &s, &t, &y, &mask, n, v);
        // Central differences in f32: step 1e-2 (truncation ~1e-4 relative), tolerance to match.
        let eps = 1e-2;
        for i in 0..n * v {
            let (mut plus, mut minus) = (s.clone(), s.clone());
            plus[i] += eps;
            minus[i] -= eps;
            let lp = evaluate::<F32>(&div, &plus, &t, &y, &mask, n, v).1;
            let lm = evaluate::<F32>(&div, &minus, &t, &y, &mask, n, v).1;
            let fd = (lp - lm) / (2.0 * eps);
            assert!((fd - grad[i]).abs() < 1e-3 + 1e-2 * grad[i].abs(), "{div:?}: d/ds[{i}] autodiff {} vs finite difference {fd}", grad[i]);
        }
    }
}

/// Collects every parameter's gradient, in visiting order.
struct Collect<'a> {
    grads: &'a GradientsParams,
    out: Vec<Vec<f32>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Collect<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let g = self.grads.get::<B::InnerBackend, D>(param.id);
        self.out.push(g.map(|g| g.into_data().convert::<f32>().to_vec().unwrap()).unwrap_or_default());
    }
}

#[test]
fn chunked_gradients_equal_unchunked() {
    let dev = Default::default();
    for name in FAMILIES {
        let (student, _) = load_model::<F32>(&fixture(name), &LoadOptions::default(), &dev).unwrap();
        let teacher = student.valid();
        // Two rows: student sees prompt+response, teacher sees a 3-token context before them.
        let ids_s: Vec<i64> = (0..2 * 9).map(|i| (i * 37 % 400) as i64).collect();
        let ids_t: Vec<i64> = (0..2 * 12).map(|i| if i % 12 < 3 { 7 + (i % 12) as i64 } else { ids_s[(i / 12) * 9 + i % 12 - 3] }).collect();
        // A fresh student forward per backward: burn frees the graph a backward pass walked.
        let hs = || student.forward_hidden(Tensor::from_data(TensorData::new(ids_s.clone(), [2, 9]), &dev), &Positions::causal(2, 9), None);
        let ht = teacher.forward_hidden(Tensor::from_data(TensorData::new(ids_t, [2, 12]), &dev), &Positions::causal(2, 12), None);
        // Response = last 5 tokens of each row; position p-1 predicts token p.
        let mut targets = Targets::default();
        for r in 0..2 {
            for p in 4..9 {
                targets.student_rows.push(r * 9 + p - 1);
                targets.teacher_rows.push(r * 12 + p + 3 - 1);
                targets.tokens.push(ids_s[r * 9 + p] as u32);
            }
        }
        for div in [Divergence::default(), Divergence { kind: DivergenceKind::Reverse, top_k: None, ..Default::default() }] {
            let chunked = backward_chunked(&div, &student, opsa_models::Trunk::from_hidden(hs()), &teacher, ht.clone(), &targets, 10, 3);
            let full = loss_unchunked(&div, &student, hs(), &teacher, ht.clone(), &targets, 10);
            let full_loss = full.clone().into_scalar() as f64;
            let full_grads = GradientsParams::from_grads(full.backward(), &student);
            assert!((chunked.loss - full_loss).abs() < 1e-6, "{name}: loss {} vs {full_loss}", chunked.loss);
            // The entropy metric: −Σ q log q of the student's full distribution at each target.
            let vocab = student.config.vocab_size;
            let rows: Vec<i64> = targets.student_rows.iter().map(|&r| r as i64).collect();
            let logits = teacher.logits(hs().inner()).reshape([2 * 9, vocab]).select(0, Tensor::<_, 1, Int>::from_data(TensorData::new(rows, [10]), &dev));
            let lq = burn::tensor::activation::log_softmax(logits, 1);
            let want: Vec<f32> = (lq.clone().exp() * lq).sum_dim(1).neg().into_data().to_vec().unwrap();
            assert_eq!(chunked.entropy.len(), want.len());
            for (i, (a, b)) in chunked.entropy.iter().zip(&want).enumerate() {
                assert!((a - b).abs() < 1e-5 * b.abs().max(1.0), "{name} {div:?}: entropy at target {i}: {a} vs {b}");
            }
            let mut a = Collect { grads: &chunked.grads, out: vec![] };
            student.visit(&mut a);
            let mut b = Collect { grads: &full_grads, out: vec![] };
            student.visit(&mut b);
            assert_eq!(a.out.len(), b.out.len());
            let mut nonzero = 0;
            for (i, (x, y)) in a.out.iter().zip(&b.out).enumerate() {
                assert_eq!(x.len(), y.len(), "{name}: param {i} has a gradient in only one of the two");
                let scale = y.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
                let d = max_abs_diff(x, y);
                assert!(d / scale < 1e-4, "{name} {div:?}: param {i} gradient differs by {d} (scale {scale})");
                nonzero += (scale > 1e-6) as usize;
            }
            assert!(nonzero > 10, "{name}: gradients reached only {nonzero} tensors");
        }
    }
}
