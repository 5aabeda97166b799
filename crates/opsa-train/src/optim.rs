//! AdamW with every hyper-parameter set explicitly, and torch-style global gradient clipping.

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;

use crate::config::OptimSection;

/// AdamW as PyTorch defines it (decoupled weight decay, `m̂ / (√v̂ + ε)`), with β1, β2, ε and
/// weight decay taken from the config (defaults there are PyTorch's, not Burn's).
pub fn adamw(o: &OptimSection) -> AdamWConfig {
    AdamWConfig::new().with_beta_1(o.beta1).with_beta_2(o.beta2).with_epsilon(o.eps).with_weight_decay(o.weight_decay)
}

struct SquaredNorm<'a> {
    grads: &'a GradientsParams,
    total: f64,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SquaredNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            let sq: f64 = g.square().sum().into_data().convert::<f64>().to_vec::<f64>().expect("f64")[0];
            self.total += sq;
        }
    }
}

struct Scale<'a> {
    grads: &'a mut GradientsParams,
    factor: f64,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.grads.register(param.id, g.mul_scalar(self.factor));
        }
    }
}

/// The L2 norm of all gradients together (not per tensor), as `torch.nn.utils.clip_grad_norm_`.
pub fn global_grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(model: &M, grads: &GradientsParams) -> f64 {
    let mut v = SquaredNorm { grads, total: 0.0 };
    model.visit(&mut v);
    v.total.sqrt()
}

/// Scale all gradients by `max_norm / (norm + 1e-6)` when the global norm exceeds `max_norm`
/// (torch's formula). Returns the norm before clipping.
pub fn clip_global_grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(model: &M, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    let norm = global_grad_norm::<B, M>(model, grads);
    if max_norm > 0.0 && norm > max_norm {
        let mut v = Scale { grads, factor: max_norm / (norm + 1e-6) };
        model.visit(&mut v);
    }
    norm
}
