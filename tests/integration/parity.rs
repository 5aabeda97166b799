//! Logits and greedy generations against Hugging Face transformers; batched == unbatched;
//! save → load round trip. Instantiated for every CPU backend compiled in, and for wgpu.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use opsa_generate::{generate, score, SamplingParams};
use opsa_models::checkpoint::config_dtype;
use opsa_models::{load_model, save_model, CausalLm, HfTokenizer, LoadOptions, WeightDType};

use crate::common::*;

fn load<B: Backend>(name: &str, device: &B::Device) -> CausalLm<B> {
    load_model::<B>(&fixture(name), &LoadOptions::default(), device).unwrap().0
}

fn logits_of<B: Backend>(model: &CausalLm<B>, ids: &[u32]) -> Vec<f32> {
    let device = model.device();
    let x = Tensor::<B, 2, Int>::from_data(
        TensorData::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), [1, ids.len()]),
        &device,
    );
    model.forward(x).into_data().convert::<f32>().to_vec().unwrap()
}

pub fn logits_match<B: Backend>(device: &B::Device, tol: f32) {
    for name in FAMILIES {
        let model = load::<B>(name, device);
        let r = reference(name);
        for (i, input) in r["inputs"].as_array().unwrap().iter().enumerate() {
            let ids = ids(input);
            let (shape, expected) = reference_logits(name, i);
            assert_eq!(shape, vec![ids.len(), model.config.vocab_size]);
            let got = logits_of(&model, &ids);
            let d = max_abs_diff(&got, &expected);
            eprintln!("{name} input {i} ({} tokens): max |logit diff| = {d:.2e}", ids.len());
            assert!(d < tol, "{name} input {i}: max |logit diff| = {d} (tolerance {tol})");
        }
    }
}

pub fn greedy_matches<B: Backend>(device: &B::Device) {
    for name in FAMILIES {
        let model = load::<B>(name, device);
        let r = reference(name);
        let eos = ids(&r["eos_ids"]);
        for (i, g) in r["greedy"].as_array().unwrap().iter().enumerate() {
            let prompt = ids(&g["prompt_ids"]);
            let expected = ids(&g["new_ids"]);
            let params = SamplingParams { max_new_tokens: 24, ..Default::default() };
            let out = generate(&model, &[prompt], &[0], &params, &eos, None).unwrap();
            assert_eq!(out[0].token_ids, expected, "{name} greedy generation {i} differs from transformers");
        }
    }
}

/// Batching (with left padding) and row removal must not change any row's tokens or log-probs.
pub fn batched_equals_unbatched<B: Backend>(device: &B::Device) {
    for name in FAMILIES {
        let model = load::<B>(name, device);
        let tok = HfTokenizer::from_dir(&fixture(name)).unwrap();
        let r = reference(name);
        let mut prompts: Vec<Vec<u32>> = r["greedy"].as_array().unwrap().iter().map(|g| ids(&g["prompt_ids"])).collect();
        prompts.push(vec![5]);
        let idx: Vec<u64> = (0..prompts.len() as u64).collect();
        for params in [
            SamplingParams { max_new_tokens: 12, ..Default::default() },
            SamplingParams { max_new_tokens: 12, temperature: 0.8, top_k: 20, top_p: 0.9, seed: 7, ..Default::default() },
            SamplingParams { max_new_tokens: 12, temperature: 1.0, seed: 3, ..Default::default() },
        ] {
            // An EOS id that some rows hit early exercises finished-row removal.
            let eos: Vec<u32> = tok.eos_ids().to_vec();
            let batched = generate(&model, &prompts, &idx, &params, &eos, Some(&tok)).unwrap();
            for (i, p) in prompts.iter().enumerate() {
                let single = generate(&model, &[p.clone()], &[i as u64], &params, &eos, Some(&tok)).unwrap();
                assert_eq!(batched[i].token_ids, single[0].token_ids, "{name} row {i}: tokens differ ({params:?})");
                let d = max_abs_diff(&batched[i].logprobs, &single[0].logprobs);
                assert!(d < 1e-4, "{name} row {i}: logprobs differ by {d}");
                assert_eq!(batched[i].finish_reason, single[0].finish_reason);
            }
        }
    }
}

/// Generation log-probs equal teacher-forced scores of the same tokens.
pub fn logprobs_equal_scores<B: Backend>(device: &B::Device) {
    let name = "qwen3-tiny";
    let model = load::<B>(name, device);
    let prompt = ids(&reference(name)["inputs"][0]);
    let params = SamplingParams { max_new_tokens: 10, temperature: 1.0, seed: 11, ..Default::default() };
    let g = generate(&model, &[prompt.clone()], &[0], &params, &[], None).unwrap().remove(0);
    let s = score(&model, &prompt, &g.token_ids).unwrap();
    let d = max_abs_diff(&g.logprobs, &s);
    assert!(d < 1e-4, "generation log-probs and scores differ by {d}");
}

pub fn save_load_roundtrip<B: Backend>(device: &B::Device) {
    for name in FAMILIES {
        let (model, cfg) = load_model::<B>(&fixture(name), &LoadOptions::default(), device).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("saved");
        let dtype = config_dtype(&cfg).unwrap_or(WeightDType::F32);
        save_model(&model, &cfg, Some(&fixture(name)), &out, dtype, false).unwrap();
        assert!(out.join("tokenizer.json").is_file() && out.join("config.json").is_file());
        // Refuses to overwrite what exists.
        assert!(save_model(&model, &cfg, None, &out, dtype, false).is_err());
        let (again, _) = load_model::<B>(&out, &LoadOptions::default(), device).unwrap();
        let ids = ids(&reference(name)["inputs"][2]);
        let d = max_abs_diff(&logits_of(&model, &ids), &logits_of(&again, &ids));
        assert!(d < 1e-6, "{name}: logits changed by {d} after save → load");
    }
}

/// The rotary inverse frequencies (llama-tiny: `llama3` scaling with one frequency kept, one
/// smoothed and the rest divided by the factor) equal transformers' `rotary_emb.inv_freq`.
#[test]
fn rope_inverse_frequencies_match_transformers() {
    for name in FAMILIES {
        let path = fixture(name).join("config.json");
        let c = opsa_models::ModelConfig::from_file(&path).unwrap().decoder(&path).unwrap();
        let got = c.rope_scaling.inv_freq(c.rope_theta, c.head_dim);
        let want: Vec<f32> = reference(name)["inv_freq"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 2.0 * f32::EPSILON * w.abs(), "{name}: inv_freq[{i}] = {g}, transformers {w}");
        }
    }
    let path = fixture("llama-tiny").join("config.json");
    let c = opsa_models::ModelConfig::from_file(&path).unwrap().decoder(&path).unwrap();
    let plain = opsa_models::rope::RopeScaling::Default.inv_freq(c.rope_theta, c.head_dim);
    let scaled = c.rope_scaling.inv_freq(c.rope_theta, c.head_dim);
    let bands: Vec<f32> = plain.iter().zip(&scaled).map(|(p, s)| p / s).collect();
    assert!(bands[0] == 1.0 && bands[1] > 1.0 && bands[1] < 7.99 && bands[2..].iter().all(|r| (r - 8.0).abs() < 1e-5), "{bands:?}");
}

macro_rules! backend_tests {
    ($modname:ident, $backend:ty, $tol:expr) => {
        mod $modname {
            type B = $backend;
            fn device() -> burn::tensor::Device<B> {
                Default::default()
            }
            #[test]
            fn logits_match_transformers() {
                super::logits_match::<B>(&device(), $tol);
            }
            #[test]
            fn greedy_generation_matches_transformers() {
                super::greedy_matches::<B>(&device());
            }
            #[test]
            fn batched_generation_equals_unbatched() {
                super::batched_equals_unbatched::<B>(&device());
            }
            #[test]
            fn generation_logprobs_equal_scores() {
                super::logprobs_equal_scores::<B>(&device());
            }
            #[test]
            fn save_load_roundtrip_keeps_logits() {
                super::save_load_roundtrip::<B>(&device());
            }
        }
    };
}

#[cfg(feature = "ndarray")]
backend_tests!(ndarray, burn::backend::NdArray, 1e-4);
#[cfg(feature = "flex")]
backend_tests!(flex, burn::backend::Flex, 1e-4);
#[cfg(feature = "wgpu")]
backend_tests!(wgpu, burn::backend::Wgpu, 1e-4);

/// bf16 weights and activations (with f32 norms, softmax and logits) stay close to the f32
/// reference; flex is the CPU backend that holds bf16.
#[cfg(feature = "flex")]
#[test]
fn bf16_logits_stay_close_to_the_f32_reference() {
    type F = burn::backend::Flex;
    let device = Default::default();
    for name in FAMILIES {
        let opts = LoadOptions { dtype: WeightDType::BF16 };
        let (model, _) = load_model::<F>(&fixture(name), &opts, &device).unwrap();
        let ids = ids(&reference(name)["inputs"][0]);
        let (_, expected) = reference_logits(name, 0);
        let d = max_abs_diff(&logits_of(&model, &ids), &expected);
        assert!(d < 0.1, "{name}: bf16 logits differ from the f32 reference by {d}");
    }
}

/// The vendored flex's element-wise ops on strided and broadcast layouts (`swap_dims` views, a
/// mask broadcast over the heads, per-row scalars; `vendor/burn-flex/src/ops/strided.rs`) give
/// what a plain loop over the logical indices gives, in f32 and bf16, below and above the size
/// at which they split over threads. Small integers, so every result is exact in both dtypes.
#[cfg(feature = "flex")]
#[test]
fn flex_strided_elementwise_ops_equal_plain_loops() {
    use burn::tensor::DType;
    type F = burn::backend::Flex;
    let device = Default::default();
    for (b, t, h, d) in [(2usize, 3usize, 4usize, 5usize), (2, 9, 8, 600)] {
        // x: [b, t, h, d] row-major; its view v = x.swap_dims(1, 2) is [b, h, t, d].
        let xs: Vec<f32> = (0..b * t * h * d).map(|i| ((i * 7) % 61) as f32).collect();
        // m: [b, 1, t, d] (broadcast over h); s: [b, h, t, 1] (one scalar per row).
        let ms: Vec<f32> = (0..b * t * d).map(|i| ((i * 5) % 37) as f32).collect();
        let ss: Vec<f32> = (0..b * h * t).map(|i| (i % 3 + 1) as f32).collect();
        let xi = |bi: usize, hi: usize, ti: usize, di: usize| xs[((bi * t + ti) * h + hi) * d + di];
        let mut want_add = Vec::new();
        let mut want_mul = Vec::new();
        let mut want_sub = Vec::new();
        let mut want_copy = Vec::new();
        for bi in 0..b {
            for hi in 0..h {
                for ti in 0..t {
                    for di in 0..d {
                        let x = xi(bi, hi, ti, di);
                        want_add.push(x + ms[(bi * t + ti) * d + di]);
                        want_mul.push(x * ss[(bi * h + hi) * t + ti]);
                        want_sub.push(ms[(bi * t + ti) * d + di] - 2.0 * x);
                        want_copy.push(x);
                    }
                }
            }
        }
        for dtype in [DType::F32, DType::BF16] {
            let x = Tensor::<F, 4>::from_data(TensorData::new(xs.clone(), [b, t, h, d]), (&device, dtype));
            let m = Tensor::<F, 4>::from_data(TensorData::new(ms.clone(), [b, 1, t, d]), (&device, dtype));
            let s = Tensor::<F, 4>::from_data(TensorData::new(ss.clone(), [b, h, t, 1]), (&device, dtype));
            let v = x.swap_dims(1, 2); // [b, h, t, d], strided
            let host = |y: Tensor<F, 4>| y.into_data().convert::<f32>().to_vec::<f32>().unwrap();
            assert_eq!(host(v.clone() + m.clone()), want_add, "{dtype:?} [{b}, {h}, {t}, {d}]: strided + broadcast over heads");
            assert_eq!(host(v.clone() * s.clone()), want_mul, "{dtype:?}: strided × per-row scalar");
            assert_eq!(host(m.clone() - v.clone().mul_scalar(2.0)), want_sub, "{dtype:?}: broadcast − strided × scalar");
            assert_eq!(host(v.clone().reshape([b * h, t * d]).reshape([b, h, t, d])), want_copy, "{dtype:?}: strided view made contiguous");
            // The broadcast mask as the scores use it: [b, h, t·d] + [b, 1, t·d].
            let flat = v.clone().reshape([b, h, t * d]) + m.clone().reshape([b, 1, t * d]);
            assert_eq!(host(flat.reshape([b, h, t, d])), want_add, "{dtype:?}: [b, h, n] + [b, 1, n]");
        }
    }
    // Empty strided views (a zero-sized innermost dimension has no rows to walk).
    let e = Tensor::<F, 4>::zeros([2, 3, 4, 0], &device).swap_dims(1, 2);
    let m = Tensor::<F, 4>::zeros([2, 1, 3, 0], &device);
    assert_eq!((e.clone() + m).dims(), [2, 4, 3, 0]);
    let doubled = e.mul_scalar(2.0);
    assert_eq!(doubled.dims(), [2, 4, 3, 0]);
    assert!(doubled.into_data().convert::<f32>().to_vec::<f32>().unwrap().is_empty());
}

/// flex's `slice_assign` (the KV cache, the backward of `slice`), `select_add` and
/// `scatter_add` (the backward of `select` and `gather`) write into the tensor's own buffer
/// when no one else holds it (`vendor/burn-flex`, patch 6). Checked against plain loops
/// (repeated indices; 2-D on both dims and 3-D), on a fresh tensor and on one whose buffer is
/// shared: the sharer must keep its values.
#[cfg(feature = "flex")]
#[test]
fn flex_in_place_writes_equal_plain_loops_and_leave_shared_buffers_alone() {
    use burn::tensor::IndexingUpdateOp::Add;
    type F = burn::backend::Flex;
    let device = Default::default();
    let host = |y: Tensor<F, 3>| y.into_data().to_vec::<f32>().unwrap();
    let (a, b, c) = (4usize, 5usize, 3usize);
    let base: Vec<f32> = (0..a * b * c).map(|i| (i % 7) as f32).collect();
    let at = |i: usize, j: usize, k: usize| (i * b + j) * c + k;
    // slice_assign of [a, 2, c] at [.., 1..3, ..], as the KV cache writes positions.
    let vals: Vec<f32> = (0..a * 2 * c).map(|i| 100.0 + i as f32).collect();
    let mut want = base.clone();
    for i in 0..a {
        for j in 0..2 {
            for k in 0..c {
                want[at(i, 1 + j, k)] = vals[(i * 2 + j) * c + k];
            }
        }
    }
    // `op` on a fresh [a, b, c] tensor of `base` and on one whose buffer is shared: both give
    // `want`, and the sharer keeps `base`.
    let both = |what: &str, want: &[f32], op: &dyn Fn(Tensor<F, 3>) -> Tensor<F, 3>| {
        for shared in [false, true] {
            let t = Tensor::<F, 3>::from_data(TensorData::new(base.clone(), [a, b, c]), &device);
            let keep = shared.then(|| t.clone());
            assert_eq!(host(op(t)), want, "{what}, shared buffer: {shared}");
            if let Some(keep) = keep {
                assert_eq!(host(keep), base, "{what}: the sharer's values changed");
            }
        }
    };
    let v = Tensor::<F, 3>::from_data(TensorData::new(vals.clone(), [a, 2, c]), &device);
    both("slice_assign", &want, &|t| t.slice_assign([0..a, 1..3, 0..c], v.clone()));
    let ids = [3usize, 0, 3, 1, 3]; // repeated: their values must all be added
    for dim in 0..3 {
        let n = [a, b, c][dim];
        let ids: Vec<usize> = ids.iter().map(|&i| i % n).collect();
        let mut vshape = [a, b, c];
        vshape[dim] = ids.len();
        let vals: Vec<f32> = (0..vshape.iter().product::<usize>()).map(|i| (i % 5 + 1) as f32).collect();
        // select_add: out[.., ids[m], ..] += vals[.., m, ..].
        let mut want = base.clone();
        for i in 0..vshape[0] {
            for j in 0..vshape[1] {
                for k in 0..vshape[2] {
                    let mut dst = [i, j, k];
                    dst[dim] = ids[dst[dim]];
                    want[at(dst[0], dst[1], dst[2])] += vals[(i * vshape[1] + j) * vshape[2] + k];
                }
            }
        }
        let idx = Tensor::<F, 1, Int>::from_data(TensorData::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), [ids.len()]), &device);
        let v = Tensor::<F, 3>::from_data(TensorData::new(vals.clone(), vshape), &device);
        both(&format!("select_add, dim {dim}"), &want, &|t| t.select_assign(dim, idx.clone(), v.clone(), Add));
        // 2-D: the same over [a, b·c] (dim 0) and [a·b, c] (dim 1).
        if dim != 1 {
            let (rows, cols, dim2) = if dim == 0 { (a, b * c, 0) } else { (a * b, c, 1) };
            let v2 = v.clone().reshape(if dim == 0 { [ids.len(), cols] } else { [rows, ids.len()] });
            both(&format!("select_add 2-D, dim {dim}"), &want, &|t| {
                t.reshape([rows, cols]).select_assign(dim2, idx.clone(), v2.clone(), Add).reshape([a, b, c])
            });
        }
        // scatter_add: out[.., idx[i, j, k], ..] += vals[i, j, k] with idx shaped like vals.
        let sidx: Vec<usize> = (0..vals.len()).map(|i| (i * 3 + 1) % n).collect();
        let mut want = base.clone();
        for i in 0..vshape[0] {
            for j in 0..vshape[1] {
                for k in 0..vshape[2] {
                    let flat = (i * vshape[1] + j) * vshape[2] + k;
                    let mut dst = [i, j, k];
                    dst[dim] = sidx[flat];
                    want[at(dst[0], dst[1], dst[2])] += vals[flat];
                }
            }
        }
        let sidx = Tensor::<F, 3, Int>::from_data(TensorData::new(sidx.iter().map(|&i| i as i64).collect::<Vec<_>>(), vshape), &device);
        both(&format!("scatter_add, dim {dim}"), &want, &|t| t.scatter(dim, sidx.clone(), v.clone(), Add));
    }
}
